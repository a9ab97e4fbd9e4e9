"""PACS round trip: N studies through a local Orthanc (store, `pacs run`'s screener, read back), model loaded once.

Starts Orthanc with its DICOMweb plugin in its own network namespace (`tests/orthanc.py`: needs root, the
Debian packages orthanc and orthanc-dicomweb), makes one DX study per real chest X-ray of ``--data``
(12-bit, MONOCHROME1 and MONOCHROME2 in turn, the classes in turn), then for each study: STOW-RS it
(store), screen it as `cxrscreen pacs run --study UID` does (QIDO, WADO-RS of the original instance, decode,
predict + gate, Grad-CAM, build SR + SC, one STOW-RS request for both), and read the SR back (QIDO + WADO-RS +
highdicom parse). A second pass over the same studies times the idempotent rerun (QIDO only, nothing
stored). Prints one JSON object (and writes it to ``--out``): seconds per study end to end (mean, median,
p90), the time per phase, the model load, the target (< 1 s per study) and whether it is met, threads, CPU
count, load average, versions.

    sudo python benchmarks/pacs_roundtrip.py [--data ../shared/data/cxr] [--studies 50] [--threads 2]
        [--out docs/results/pacs_roundtrip.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 1.0


def _images(data: Path, n: int) -> list[Any]:
    import cv2
    import numpy as np
    import pandas as pd

    df = pd.read_csv(data / "manifest.csv", dtype=str, keep_default_na=False)
    per = {c: df[df["label"] == c].reset_index(drop=True) for c in ("covid", "normal", "pneumonia")}
    out = []
    for i in range(n):
        row = per[("covid", "normal", "pneumonia")[i % 3]].iloc[i // 3]
        out.append(cv2.imread(str(data / row["image"]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "cxr")
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: images go one at a time, and it is "
                    "several times faster than 2 on a machine busy with other work)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "pacs_roundtrip.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch
    from tests.dicom_fixtures import dx_dataset
    from tests.orthanc import PASSWORD, USER, missing_reason, start_orthanc, stop_orthanc

    reason = missing_reason()
    if reason is not None:
        raise SystemExit(f"cannot run: {reason}")
    torch.set_num_threads(args.threads)
    images = _images(args.data.resolve(), args.studies)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_orthanc(Path(tmp) / "orthanc")
        try:
            with server.inside():
                result = _run(server, images, dx_dataset, USER, PASSWORD)
        finally:
            stop_orthanc(server)
    result.update({
        "studies": args.studies, "target_s_per_study": TARGET_S,
        "target_met": result.pop("_mean_s") < TARGET_S,
        "torch_threads": args.threads, "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "machine": platform.machine(),
        "versions": {p: metadata.version(p) for p in ("cxrscreen", "torch", "highdicom", "dicomweb-client",
                                                         "pydicom")},
        "orthanc": "1.10 (Debian) + DICOMweb plugin, in its own network namespace, loopback HTTP",
        "command": "sudo python benchmarks/pacs_roundtrip.py " + " ".join(sys.argv[1:]),
    })
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")


def _run(server: Any, images: list[Any], dx_dataset: Any, user: str, password: str) -> dict[str, Any]:
    import highdicom as hd

    from cxrscreen.gate.model import gate_for_run
    from cxrscreen.pacs.client import Credentials, PacsClient
    from cxrscreen.pacs.run import StudyScreener
    from cxrscreen.predict.predictor import load_model

    client = PacsClient(server.dicomweb_url, creds=Credentials(user, password))
    t0 = time.perf_counter()
    run = load_model()
    screener = StudyScreener(run, client, gate=gate_for_run(run), rule=run.decision_rule())
    load_s = time.perf_counter() - t0
    phases: dict[str, float] = {}
    per_study: list[float] = []
    outcomes = []
    uids = []
    for i, img in enumerate(images):
        ds = dx_dataset(img, monochrome1=i % 2 == 0)
        t_study = time.perf_counter()
        client.store([ds])
        t1 = time.perf_counter()
        phases["store_source"] = phases.get("store_source", 0.0) + t1 - t_study
        outcome = screener.screen(str(ds.StudyInstanceUID))
        t2 = time.perf_counter()
        for k, v in outcome.seconds.items():
            phases[k] = phases.get(k, 0.0) + v
        phases["screen_other"] = phases.get("screen_other", 0.0) + (t2 - t1) - sum(outcome.seconds.values())
        if not outcome.ok:
            print(json.dumps(outcome.to_dict()), file=sys.stderr)
        sr_refs = [r for r in client.instances(str(ds.StudyInstanceUID))
                   if r.sop_class == "1.2.840.10008.5.1.4.1.1.88.34"]
        # the parsed answer as it came (no re-encoding, no copy: the dataset is ours)
        sr = hd.sr.Comprehensive3DSR.from_dataset(client.retrieve_dataset(sr_refs[0]), copy=False)
        n_groups = len(sr.content.get_image_measurement_groups())
        t3 = time.perf_counter()
        phases["read_back_sr"] = phases.get("read_back_sr", 0.0) + t3 - t2
        per_study.append(t3 - t_study)
        outcomes.append((outcome.screened, outcome.stored, outcome.ok, n_groups))
        uids.append(str(ds.StudyInstanceUID))
    t4 = time.perf_counter()
    rerun = [screener.screen(u) for u in uids]
    rerun_s = (time.perf_counter() - t4) / len(uids)
    n = len(images)
    per_sorted = sorted(per_study)
    return {
        "_mean_s": statistics.mean(per_study),
        "end_to_end_s_per_study": {"mean": round(statistics.mean(per_study), 3),
                                   "median": round(statistics.median(per_study), 3),
                                   "p90": round(per_sorted[int(0.9 * (n - 1))], 3),
                                   "first": round(per_study[0], 3)},
        "phase_s_per_study": {k: round(v / n, 4) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "model_load_s": round(load_s, 2),
        "rerun_s_per_study": round(rerun_s, 4),
        "rerun_stored": sum(o.stored for o in rerun),
        "screened": sum(o[0] for o in outcomes), "stored": sum(o[1] for o in outcomes),
        "failed_studies": sum(not o[2] for o in outcomes),
        "flagged_by_gate": sum(o[3] == 1 for o in outcomes),
        "phases": "store_source: STOW of the source study (the modality's part); query: QIDO of the study's "
                  "instances; fetch: WADO-RS of the original instance; decode: read_xray; predict: preprocessing,"
                  " gate and forward pass; heatmap: Grad-CAM (its backward pass stops at the target layer: "
                  "explain.cam.gradients_from); build_and_store: SR + SC with highdicom and their STOW (one request); "
                  "read_back_sr: QIDO + WADO + highdicom parse of the SR (the parsed answer, not re-encoded)",
    }


if __name__ == "__main__":
    main()
