"""Start-up cost of `cxrscreen predict one.png`, per engine, in fresh processes (JSON on stdout).

Measures, for the torch and the onnxruntime engine with the bundled model:
- time to first result: wall seconds of `python -m cxrscreen.cli predict IMAGE [--engine E]` from process start to
  exit (one image, no heatmap), the median of `--repeats` runs after one discarded run that warms the disk cache;
- what importing the prediction path costs: `import cxrscreen.predict.predictor` in a fresh process, its wall
  seconds, how many modules it loads (cxrscreen's own and in all), and whether torch is among them.

Targets (issue 23): time to first result <= 1.5 s with ONNX Runtime (warm disk cache).

    python benchmarks/startup.py [--image PATH] [--repeats 5] > docs/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT / ".." / "shared" / "data" / "cxr" / "images" / "nih" / "00000061_012.jpg"
TARGET_TTFR_ONNX_S = 1.5

IMPORT_PROBE = """
import json, sys, time
t = time.perf_counter()
import cxrscreen.predict.predictor  # noqa: F401
s = time.perf_counter() - t
mods = list(sys.modules)
print(json.dumps({"seconds": s, "modules": len(mods), "cxrscreen_modules": sum(m.startswith("cxrscreen") for m in mods),
                  "torch_loaded": "torch" in sys.modules,
                  "training_loaded": sorted(m for m in mods if m.startswith(("cxrscreen.training", "cxrscreen.engine",
                                                                               "cxrscreen.cli")))}))
"""


def time_to_first_result(image: Path, engine: str, repeats: int, threads: int) -> dict[str, Any]:
    """Median wall seconds of a fresh `cxrscreen predict IMAGE` (one warm-up run discarded) and its output line."""
    cmd = [sys.executable, "-m", "cxrscreen.cli", "predict", str(image), "--engine", engine, "--threads", str(threads)]
    times, line = [], ""
    for i in range(repeats + 1):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        dt = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        line = proc.stdout.strip().splitlines()[-1]
        if i:  # the first run warms the disk cache
            times.append(dt)
    return {"command": " ".join(["cxrscreen", *cmd[3:]]), "seconds_median": round(statistics.median(times), 3),
            "seconds_min": round(min(times), 3), "seconds_max": round(max(times), 3), "runs": len(times),
            "result": line}


def import_cost(repeats: int) -> dict[str, Any]:
    """`import cxrscreen.predict.predictor` in fresh processes: median seconds, module counts, torch loaded?"""
    runs = []
    for _ in range(repeats + 1):
        proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=300,
                              check=True)
        runs.append(json.loads(proc.stdout))
    last = runs[-1]
    return {"import": "cxrscreen.predict.predictor", "seconds_median": round(statistics.median(
        r["seconds"] for r in runs[1:]), 3), "modules": last["modules"], "cxrscreen_modules": last["cxrscreen_modules"],
        "torch_loaded": last["torch_loaded"], "training_or_cli_modules_loaded": last["training_loaded"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="one chest X-ray (default: an NIH film in "
                                                                       "../shared)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per engine (after one warm-up run)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.image.is_file():
        raise SystemExit(f"{args.image}: no such image (pass --image)")
    engines = {e: time_to_first_result(args.image, e, args.repeats, args.threads) for e in ("torch", "onnxruntime")}
    from cxrscreen import __version__

    ttfr = engines["onnxruntime"]["seconds_median"]
    result = {
        "benchmark": "startup",
        "image": os.path.relpath(args.image.resolve(), ROOT.parent),
        "time_to_first_result": engines,
        "import_predictor": import_cost(args.repeats),
        "targets": {"ttfr_onnxruntime_s": {"target": f"<= {TARGET_TTFR_ONNX_S}", "value": ttfr,
                                           "met": ttfr <= TARGET_TTFR_ONNX_S}},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "cxrscreen": __version__,
                    "load_average_1min": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
