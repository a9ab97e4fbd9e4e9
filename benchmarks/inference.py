"""End-to-end prediction speed and memory of the default model against a DenseNet121 at 224 px.

One run, 2 threads, models warmed up. Prints JSON:
- images/s of `Predictor.predict_files` over 256 images of ../shared/data/cxr (decode + CLAHE + resize
  + model, batch 32), and single-image latency (median, p95), for the model under test and for a
  DenseNet121 at 224 px with random weights (torchxrayvision's architecture; timing only);
- the ratio of the two throughputs (target: >= 5);
- peak RSS of a `cxrscreen predict` process over the same 256 images (target: <= 1.5 GB).

    python benchmarks/inference.py [--model RUN_DIR] [--images 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from cxrscreen.data.manifest import manifest_root, read_manifest, resolve_image_paths
from cxrscreen.models.registry import create_model
from cxrscreen.predict import Predictor, load_model
from cxrscreen.runs import LoadedRun, package_versions
from cxrscreen.transforms import PreprocessConfig


def densenet121_run() -> LoadedRun:
    config = {"arch": "densenet121", "kind": "classifier", "classes": ["covid", "normal", "pneumonia"],
              "preprocess": PreprocessConfig(image_size=224).to_dict()}
    return LoadedRun(model=create_model("densenet121").eval(), config=config, run_dir=Path("."))


def measure(run: LoadedRun, paths: list[Path], batch: int, n_latency: int) -> dict[str, float]:
    pred = Predictor(run, batch_size=batch)
    for _ in pred.predict_files(paths[:batch]):  # warm-up
        pass
    t0 = time.perf_counter()
    n = sum(1 for res, _ in pred.predict_files(paths) if res["error"] is None)
    rate = n / (time.perf_counter() - t0)
    single = Predictor(run, batch_size=1)
    lat = []
    for p in paths[:n_latency]:
        t = time.perf_counter()
        for _ in single.predict_files([p]):
            pass
        lat.append(1000 * (time.perf_counter() - t))
    lat.sort()
    return {"images_per_s": round(rate, 1), "latency_ms_median": round(statistics.median(lat), 1),
            "latency_ms_p95": round(lat[int(0.95 * (len(lat) - 1))], 1), "images": n}


def peak_rss_mb(model: str | None, paths: list[Path], threads: int) -> float:
    """Peak resident memory (MB) of a `cxrscreen predict` process over `paths`.

    Read from the child's /proc/<pid>/status VmHWM while it runs: getrusage's ru_maxrss of children
    would count the moment after fork, when the child still shares this (large) process's pages.
    """
    cmd = [sys.executable, "-m", "cxrscreen.cli", "predict", *map(str, paths), "--json"]
    if model is not None:
        cmd += ["--model", model]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    peak_kb = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    return round(peak_kb / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="run directory (default: the bundled model)")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared/data/cxr")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-images", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    df = read_manifest(args.data).sample(frac=1.0, random_state=1).head(args.images)
    paths = resolve_image_paths(df, manifest_root(args.data))
    run = load_model(args.model)
    ours = measure(run, paths, 32, args.latency_images)
    dense = measure(densenet121_run(), paths, 32, args.latency_images)
    print(json.dumps({
        "benchmark": "inference",
        "threads": args.threads,
        "model": {"arch": run.arch, "image_size": run.preprocess.image_size, **ours},
        "densenet121_224": dense,
        "throughput_ratio": round(ours["images_per_s"] / dense["images_per_s"], 2),
        "target_ratio": 5.0,
        "predict_peak_rss_mb": peak_rss_mb(args.model, paths, args.threads),
        "target_peak_rss_mb": 1536,
        "versions": package_versions(),
    }, indent=2))


if __name__ == "__main__":
    main()
