"""Batch screening speed and memory: `cxrscreen predict MANIFEST --out FILE` with each engine and worker count.

For every (engine, workers) pair, interleaved (torch w1, onnxruntime w1, torch w2, ...) so that both engines
meet the same background load, one `cxrscreen predict` subprocess screens the same images into a fresh CSV.
Prints one JSON object:

- per configuration: images/s of the screening loop (from the command's own summary: decode + preprocess +
  gate in the workers, model in the main process, rows written and fsync'ed), wall seconds of the whole
  command (start-up, model load and worker spawn included), peak RSS of the process tree (main process plus
  decode workers, sampled every 0.1 s) and of the largest single process, errors;
- the ONNX Runtime / PyTorch ratio at each worker count (target >= 1.5) and whether it is met;
- forward passes alone (no decoding), batch 32, both engines on the same preprocessed images: images/s and
  the ratio, which separates the engine's own speed from the decoding that bounds the whole run;
- parity: max |p_onnxruntime - p_torch| over the first `--parity-images` images;
- the load average before and after, CPU count, threads, versions.

    python benchmarks/batch_predict.py --data data/merged [--limit N] [--workers 1 2]
        [--engines torch onnxruntime] [--model RUN_DIR] [--threads T] [--out docs/results/batch_predict.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.data.manifest import check_columns, manifest_csv, read_csv_strings

TARGET_RATIO = 1.5


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """(sum, max) of VmRSS in MB over `pid` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/status"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        p = int(stat.parent.name)
        children.setdefault(int(fields.get("PPid", "0").strip() or 0), []).append(p)
        if "VmRSS" in fields:
            rss[p] = float(fields["VmRSS"].split()[0]) / 1024
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children.get(p, [])
    values = [rss.get(p, 0.0) for p in seen]
    return sum(values), max(values, default=0.0)


def run_config(cmd: list[str]) -> dict[str, Any]:
    """Run one screening command, sampling its tree's memory; returns wall time, peak RSS and its summary."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = [0.0, 0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total, largest = tree_rss_mb(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], total), max(peaks[1], largest)
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - t0
    lines = [line for line in err.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, 1) or not lines:
        raise SystemExit(f"screening failed (exit {proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    summary = json.loads(lines[-1])
    return {"images_per_s": summary["images_per_s"], "screened": summary["screened"], "errors": summary["errors"],
            "loop_seconds": summary["seconds"], "wall_seconds": round(wall, 1),
            "peak_rss_mb_tree": round(peaks[0], 1), "peak_rss_mb_largest_process": round(peaks[1], 1)}


def forward_only(run_dir: Path | None, onnx_file: Path, files: list[Path], threads: int | None) -> dict[str, Any]:
    """Forward passes alone (batch 32) of both engines on the same preprocessed images, and their parity."""
    import torch

    from cxrscreen.io.xray import read_xray
    from cxrscreen.predict.onnx_engine import load_onnx_run
    from cxrscreen.predict.predictor import Predictor, load_model

    if threads:
        torch.set_num_threads(threads)
    torch_pred = Predictor(load_model(run_dir))
    onnx_pred = Predictor(load_onnx_run(onnx_file, threads=threads))
    images = [torch_pred.prepare(read_xray(f)).image for f in files]
    batches = [images[i:i + 32] for i in range(0, len(images), 32)]
    out: dict[str, Any] = {"images": len(images), "batch": 32}
    probs = {}
    for name, pred in (("torch", torch_pred), ("onnxruntime", onnx_pred)):
        pred.probabilities(batches[0])  # warm-up
        t0 = time.perf_counter()
        probs[name] = np.concatenate([pred.probabilities(b) for b in batches])
        out[f"{name}_images_per_s"] = round(len(images) / (time.perf_counter() - t0), 1)
    out["ratio_onnxruntime_over_torch"] = round(out["onnxruntime_images_per_s"] / out["torch_images_per_s"], 2)
    out["parity_max_abs_diff_probabilities"] = float(np.abs(probs["torch"] - probs["onnxruntime"]).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/merged"), help="manifest folder or csv")
    ap.add_argument("--limit", type=int, default=None, help="screen every k-th image so that about N remain")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engines", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"])
    ap.add_argument("--model", type=Path, default=None, help="run directory (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=None, help="forward-pass threads (default: one per core)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--parity-images", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]
    src = manifest_csv(args.data)
    df = read_csv_strings(src)
    check_columns(df, ["image"], src)
    step = max(1, len(df) // args.limit) if args.limit else 1
    sub = df.iloc[::step].head(args.limit) if args.limit else df
    with tempfile.TemporaryDirectory(prefix="cxr_batch_bench_") as tmp_name:
        tmp = Path(tmp_name)
        manifest = tmp / "manifest.csv"
        root = src.parent.resolve()
        sub.assign(image=[str(root / p) for p in sub["image"]])[["image"]].to_csv(manifest, index=False)
        onnx_file = tmp / "model.onnx"
        export = [sys.executable, "-m", "cxrscreen.cli", "export", "--out", str(onnx_file)]
        if args.model:
            export += ["--model", str(args.model)]
        subprocess.run(export, check=True, capture_output=True)

        configs: dict[str, dict[str, Any]] = {}
        for w in args.workers:
            for engine in args.engines:
                out = tmp / f"{engine}_w{w}.csv"
                cmd = [sys.executable, "-m", "cxrscreen.cli", "predict", str(manifest), "--out", str(out),
                       "--engine", engine, "--workers", str(w), "--batch-size", str(args.batch_size),
                       "--model", str(onnx_file if engine == "onnxruntime" else args.model or "")]
                if engine == "torch" and args.model is None:
                    cmd = cmd[:-2]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                configs[f"{engine}_workers{w}"] = {"engine": engine, "workers": w, **run_config(cmd)}
                print(f"{engine} workers {w}: {configs[f'{engine}_workers{w}']}", file=sys.stderr)

        ratios = {}
        for w in args.workers:
            t, o = configs.get(f"torch_workers{w}"), configs.get(f"onnxruntime_workers{w}")
            if t and o:
                r = round(o["images_per_s"] / t["images_per_s"], 2)
                ratios[f"workers{w}"] = {"ratio": r, "target": TARGET_RATIO, "met": r >= TARGET_RATIO}
        files = [Path(p) for p in pd_images(manifest)[: args.parity_images]]
        fwd = forward_only(args.model, onnx_file, files, args.threads)

    result = {
        "benchmark": "batch_predict",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "data": {"manifest": str(src), "rows": len(df), "screened": len(sub), "every_kth": step},
        "model": str(args.model) if args.model else "bundled (tf_efficientnet_lite0, 192 px)",
        "batch_size": args.batch_size,
        "configs": configs,
        "ratio_onnxruntime_over_torch": ratios,
        "forward_only": fwd,
        "parity_max_abs_diff_probabilities": fwd["parity_max_abs_diff_probabilities"],
        "conditions": {"loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                       "cpu_count": os.cpu_count(), "threads": args.threads or "default (one per core)",
                       "machine": platform.machine(), "python": platform.python_version()},
        "versions": {n: _version(n) for n in ("cxrscreen", "torch", "onnxruntime", "onnx", "timm",
                                               "opencv-python-headless")},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def pd_images(manifest: Path) -> list[str]:
    """The image column of a manifest csv."""
    return list(read_csv_strings(manifest)["image"])


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
