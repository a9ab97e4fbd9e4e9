"""What lung segmentation costs `predict`: per-image time and peak memory with and without it.

Same files (``--images`` of ../shared/data/cxr, shuffled with seed 1), same threads, both sides warmed up; the
two sides alternate ``--repeats`` times and the median is kept (the machine may be shared). "without": the
bundled model and gate as `cxrscreen predict` runs them; "with": the same plus the gate's lungs rule
(`--lung-check`: the batch's images segmented together, lung sizes read on the network's grid). Also the
segmenter alone per image (PyTorch, with and without the full-size masks, its frozen graph, and ONNX Runtime
when installed) and the peak RSS of a `cxrscreen predict` process each way (target: within the 1.5 GB limit of
benchmarks/inference.py).
Target: segmentation adds at most 25 % per image. Prints one JSON object.

    python benchmarks/lungs_speed.py --images 128 --threads 2 --out docs/results/lungs/speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from inference import peak_rss_mb  # the same poller (this folder is on sys.path when run)

from cxrscreen.data.manifest import manifest_root, read_manifest, resolve_image_paths
from cxrscreen.gate.model import gate_for_run
from cxrscreen.io.files import write_json
from cxrscreen.io.xray import read_xray
from cxrscreen.lungs.segmenter import LungSegmenter
from cxrscreen.predict.predictor import Predictor, load_model
from cxrscreen.runs.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
TARGET_OVERHEAD = 0.25
TARGET_PEAK_RSS_MB = 1536.0


def time_predict(predictor: Predictor, paths: list[Path]) -> float:
    """Seconds per image of predict_files over paths."""
    t0 = time.perf_counter()
    for _ in predictor.predict_files(paths):
        pass
    return (time.perf_counter() - t0) / len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cxr")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    df = read_manifest(args.data)
    paths = resolve_image_paths(df, manifest_root(args.data))
    paths = [paths[i] for i in np.random.default_rng(1).permutation(len(paths))[: args.images]]
    run = load_model(None)
    plain_gate, lung_gate = gate_for_run(run), gate_for_run(run)
    lung_gate.lungs_rule = True
    sides = {"without": Predictor(run, gate=plain_gate), "with": Predictor(run, gate=lung_gate)}
    for p in sides.values():
        p.expect(len(paths))  # as `cxrscreen predict` does (from 64 inputs on: the classifier's frozen graph)
        time_predict(p, paths[:8])  # warm up (the segmenter loads on first use)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.repeats):
        for k, p in sides.items():
            times[k].append(time_predict(p, paths))
    ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
    overhead = ms["with"] / ms["without"] - 1
    seg = LungSegmenter.load()
    pixels = [read_xray(p).pixels for p in paths[:32]]

    def seg_ms(segmenter: LungSegmenter, full_size: bool = False) -> float:
        """ms per image of one batch pass over fresh copies (a segmenter remembers the arrays it has seen);
        `full_size`: also the masks at the input's size (what `segment` writes), not only the lungs' sizes."""
        segmenter.segment_many([p.copy() for p in pixels[:4]])  # warm-up
        fresh = [p.copy() for p in pixels]
        t0 = time.perf_counter()
        for res in segmenter.segment_many(fresh):
            if full_size:
                res.mask  # noqa: B018 (computed on first use)
        return round(1000 * (time.perf_counter() - t0) / len(fresh), 2)

    alone: dict[str, float | None] = {"torch": seg_ms(seg), "torch_full_size_masks": seg_ms(seg, True)}
    seg._freeze()  # what a segmenter does by itself after FREEZE_AFTER_IMAGES images
    alone["torch_frozen_graph"] = seg_ms(seg) if seg._graph is not None else None
    try:
        from cxrscreen.lungs.export import export_lungs_onnx, load_lungs_onnx

        with tempfile.TemporaryDirectory() as tmp:
            export_lungs_onnx(seg, Path(tmp) / "lungs.onnx")
            alone["onnxruntime"] = seg_ms(load_lungs_onnx(Path(tmp) / "lungs.onnx", threads=args.threads))
    except ImportError:
        alone["onnxruntime"] = None
    rss = {"without": peak_rss_mb(None, paths[:64], args.threads, ok_status=(0, 1)),
           "with": peak_rss_mb(None, paths[:64], args.threads, ["--lung-check"], ok_status=(0, 1))}
    out = {
        "benchmark": "lungs_speed", "images": len(paths), "threads": args.threads, "repeats": args.repeats,
        "predict_ms_per_image": ms, "all_runs_ms": {k: [round(1000 * t, 2) for t in v] for k, v in times.items()},
        "segmentation_overhead": round(overhead, 3),
        "segmenter_alone_ms_per_image": alone,
        "segmenter": {"arch": seg.config.get("arch"), "image_size": seg.preprocess.image_size,
                      "weights_sha256": seg.config.get("weights_sha256")},
        "predict_peak_rss_mb": rss,
        "targets": {"overhead": {"target": f"<= {TARGET_OVERHEAD}", "value": round(overhead, 3),
                                 "met": overhead <= TARGET_OVERHEAD},
                    "peak_rss_mb_with": {"target": f"<= {TARGET_PEAK_RSS_MB}", "value": rss["with"],
                                         "met": rss["with"] <= TARGET_PEAK_RSS_MB}},
        "load_average_before": [round(v, 2) for v in load0],
        "load_average_after": [round(v, 2) for v in os.getloadavg()], **provenance(),
    }
    if args.out:
        write_json(args.out, out)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
