"""What the gate's opt-in lungs rule refuses among the real X-rays of ../shared that the current gate accepts.

Every image of ../shared/data/{cxr,siim,lesions,external}/manifest.csv is read, put through the bundled gate
(hard rules + fitted scores, the lungs rule off) and through the bundled lung segmenter. Reports, per set and in
all: images, accepted by the current gate, and of those how many the lungs rule (each lung >= min_lung_fraction of
the image) would refuse, at the shipped threshold and a few others, with the refused files named. Nothing is
fitted here (external is the selection set: read only).

    python scripts/lung_gate_check.py --out docs/results/lungs/gate_check.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrscreen.errors import CXRError
from cxrscreen.gate.model import MIN_LUNG_FRACTION, Gate, bundled_gate_path
from cxrscreen.io.files import write_json
from cxrscreen.io.xray import read_xray
from cxrscreen.lungs.segmenter import LungSegmenter
from cxrscreen.runs.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
SETS = ("cxr", "siim", "lesions", "external")
THRESHOLDS = (0.005, 0.01, 0.02, 0.03, 0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rows", type=Path, default=None, help="also write the per-image CSV here (outside the repo)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images of each set (a quick check)")
    args = ap.parse_args()
    t0 = time.monotonic()
    gate_path = bundled_gate_path()
    if gate_path is None:
        raise SystemExit("no bundled gate")
    gate = Gate.from_json(gate_path)
    seg = LungSegmenter.load()
    rows: list[dict[str, Any]] = []
    for name in SETS:
        man_path = args.data / name / "manifest.csv"
        if not man_path.is_file():
            continue
        images = pd.read_csv(man_path, dtype=str, keep_default_na=False)["image"].tolist()[: args.limit]
        for img in images:
            row: dict[str, Any] = {"set": name, "image": img}
            try:
                xray = read_xray(args.data / name / img)
                row["accepted"] = not gate.flags(xray)
                fr = seg.segment(xray.pixels).fractions
                row["right"], row["left"] = fr["right"], fr["left"]
            except CXRError as exc:
                row["error"] = exc.problem
            rows.append(row)
        print(f"{name}: {len(images)} images ({time.monotonic() - t0:.0f} s)", flush=True)
    df = pd.DataFrame(rows)
    if "error" not in df:
        df["error"] = np.nan
    df["min_lung"] = df[["right", "left"]].min(axis=1)
    if args.rows:
        df.to_csv(args.rows, index=False)
    ok = df[df["error"].isna()]
    acc = ok[ok["accepted"].astype(bool)]

    def refused(part: pd.DataFrame, thr: float) -> int:
        return int((part["min_lung"] < thr).sum())

    out: dict[str, Any] = {
        "check": "the gate's opt-in lungs rule on every real X-ray of ../shared",
        "min_lung_fraction_shipped": MIN_LUNG_FRACTION,
        "images": len(df), "unreadable": int(df["error"].notna().sum()),
        "accepted_by_current_gate": len(acc),
        "refused_by_lungs_rule_among_accepted": {f"{t:g}": refused(acc, t) for t in THRESHOLDS},
        "refused_files_at_shipped_threshold": [f"{r.set}/{r.image} (right {100 * r.right:.1f} %, left "
                                               f"{100 * r.left:.1f} %)"
                                               for r in acc[acc["min_lung"] < MIN_LUNG_FRACTION].itertuples()],
        "min_lung_fraction_quantiles_among_accepted": {f"{q:g}": round(float(acc["min_lung"].quantile(q)), 4)
                                                       for q in (0, 0.001, 0.01, 0.05, 0.5)},
        "per_set": {name: {"images": int((df["set"] == name).sum()),
                           "accepted": int((acc["set"] == name).sum()),
                           "refused_by_lungs_rule": refused(acc[acc["set"] == name], MIN_LUNG_FRACTION)}
                    for name in SETS if (df["set"] == name).any()},
        "seconds": round(time.monotonic() - t0, 1), **provenance(),
    }
    if args.out:
        write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
