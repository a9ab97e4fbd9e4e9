"""Load benchmark of `cxrscreen serve`; prints one JSON object.

Starts the server (bundled model and gate, this checkout's sources) on 127.0.0.1 at a free port, sends
each of a fixed sample of real X-rays of ../shared/data/cxr once, one at a time, with and without heatmap
(the sequential references), then a bounded load: `--clients` concurrent clients sending `--requests`
requests each without heatmap, then `--heatmap-requests` each with heatmap, and stops the server. Reports
per phase p50 / p95 latency, requests/s, errors, whether every response equals the sequential one for the
same image (class and flags exactly, probabilities within 1e-5), the server's peak RSS (VmHWM), and the
load conditions (CPUs, load average before and after). By default it does this twice: with torch's own
thread count (one per core) and with one torch thread (`cxrscreen serve --threads 1`), which is faster
when the CPUs are shared (here: with the clients themselves).

    python benchmarks/serve_load.py > docs/results/serve_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO / ".." / "shared" / "data" / "cxr").resolve()
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample(data_dir: Path, n: int) -> list[Path]:
    """n real X-rays spread over the sorted manifest (every k-th), read in place."""
    m = pd.read_csv(data_dir / "manifest.csv").sort_values("image").reset_index(drop=True)
    idx = np.linspace(0, len(m) - 1, n).round().astype(int)
    return [data_dir / m["image"][i] for i in idx]


def _peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a process, MB; None where /proc is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _start_server(port: int, torch_threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    threads = "" if torch_threads is None else f"import torch; torch.set_num_threads({int(torch_threads)}); "
    code = (threads + "import sys, uvicorn; from cxrscreen.serving.app import create_app; "
            "from cxrscreen.gate.model import gate_for_run; "
            "from cxrscreen.predict.predictor import load_model; run = load_model(None); app = create_app(run, "
            "gate=gate_for_run(run)); "
            f"uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning')")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_ready(client: Any, base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if client.get(base + "healthz", timeout=2).status_code == 200:
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start in time")


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Class and flags exactly, probabilities within TOLERANCE."""
    if a.get("class") != b.get("class") or a.get("flags") != b.get("flags"):
        return False
    pa, pb = a.get("probabilities"), b.get("probabilities")
    if pa is None or pb is None:
        return pa is pb
    return pa.keys() == pb.keys() and all(abs(pa[k] - pb[k]) <= TOLERANCE for k in pa)


def _post(client: Any, base: str, name: str, data: bytes, heatmap: bool) -> tuple[float, int, dict | None]:
    t = time.perf_counter()
    try:
        r = client.post(base + "api/predict", params={"heatmap": "true"} if heatmap else None,
                        files={"file": (name, data, "application/octet-stream")}, timeout=120)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
        return time.perf_counter() - t, r.status_code, body
    except Exception:
        return time.perf_counter() - t, -1, None


def _phase(base: str, images: list[tuple[str, bytes]], refs: list[dict], n_requests: int, clients: int,
           heatmap: bool) -> dict[str, Any]:
    """`n_requests` requests from `clients` threads (request i sends image i mod len(images))."""
    import httpx

    local = threading.local()

    def one(i: int) -> tuple[float, int, bool]:
        if not hasattr(local, "client"):
            local.client = httpx.Client()
        k = i % len(images)
        dt, status, body = _post(local.client, base, images[k][0], images[k][1], heatmap)
        ok = status == 200 and body is not None
        return dt, status, ok and _same(body, refs[k]) and (not heatmap or body.get("class") is None
                                                            or bool(body.get("heatmap_png_base64")))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - t0
    lat = np.array([o[0] for o in out]) * 1000
    return {
        "requests": n_requests,
        "clients": clients,
        "heatmap": heatmap,
        "seconds": round(wall, 2),
        "requests_per_s": round(n_requests / wall, 2),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
        "latency_ms_p95": round(float(np.percentile(lat, 95)), 1),
        "errors": int(sum(o[1] != 200 for o in out)),
        "all_equal_sequential": all(o[2] for o in out),
        "not_equal_sequential": int(sum(not o[2] for o in out)),
    }


def run_server_load(images: list[tuple[str, bytes]], *, clients: int, per_client: int, heatmap_per_client: int,
                    torch_threads: int | None) -> dict[str, Any]:
    """Start a server, take the sequential references, run both load phases, stop it; the report."""
    import httpx

    load_before = os.getloadavg()
    port = _free_port()
    base = f"http://127.0.0.1:{port}/"
    proc = _start_server(port, torch_threads)
    try:
        with httpx.Client() as client:
            _wait_ready(client, base, proc)
            model = client.get(base + "api/model").json()
            refs, refs_hm, seq_lat = [], [], []
            for name, data in images:  # sequential references, one request at a time
                dt, status, body = _post(client, base, name, data, heatmap=False)
                if status != 200 or body is None:
                    raise SystemExit(f"sequential request for {name} failed: HTTP {status}")
                refs.append(body)
                seq_lat.append(dt * 1000)
            for name, data in images:
                _, status, body = _post(client, base, name, data, heatmap=True)
                refs_hm.append(body if status == 200 and body is not None else {})
            rss_after_warmup = _peak_rss_mb(proc.pid)
        plain = _phase(base, images, refs, clients * per_client, clients, heatmap=False)
        heat = _phase(base, images, refs_hm, clients * heatmap_per_client, clients, heatmap=True)
        peak = _peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "server_torch_threads": torch_threads or "torch default (one per core)",
        "load_average_1_5_15_before": [round(v, 2) for v in load_before],
        "load_average_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
        "model": {"arch": model.get("arch"), "weights_sha256": (model.get("weights_sha256") or "")[:12],
                  "image_size": model.get("preprocess", {}).get("image_size")},
        "flagged_by_gate": sum(r["class"] is None for r in refs),
        "sequential_latency_ms_p50": round(float(np.percentile(seq_lat, 50)), 1),
        "without_heatmap": plain,
        "with_heatmap": heat,
        "server_peak_rss_mb": peak,
        "server_rss_mb_after_warmup": rss_after_warmup,
        "targets": {
            "zero_errors": plain["errors"] == 0 and heat["errors"] == 0,
            "all_equal_sequential": plain["all_equal_sequential"] and heat["all_equal_sequential"],
            "requests_per_s_ge_40": plain["requests_per_s"] >= 40,
            "p50_le_200_ms": plain["latency_ms_p50"] <= 200,
            "peak_rss_le_2_gb": peak is not None and peak <= 2048,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--images", type=int, default=64, help="distinct real X-rays sent")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200, help="requests per client without heatmap")
    ap.add_argument("--heatmap-requests", type=int, default=50, help="requests per client with heatmap")
    ap.add_argument("--torch-threads", type=int, action="append", default=None,
                    help="torch intra-op threads in the server, repeatable: one server run per value "
                         "(default: torch's own, one per core, then 1)")
    ap.add_argument("--note", default=None, help="free text about the machine's load, kept in the JSON")
    args = ap.parse_args(argv)

    if not (args.data / "manifest.csv").is_file():
        raise SystemExit(f"real data not found at {args.data}")
    images = [(p.name, p.read_bytes()) for p in _sample(args.data, args.images)]
    settings = args.torch_threads or [None, 1]
    runs = [run_server_load(images, clients=args.clients, per_client=args.requests,
                            heatmap_per_client=args.heatmap_requests, torch_threads=t) for t in settings]
    report = {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "conditions": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": args.note,
            "server": "uvicorn, one process, bundled model and gate, forward passes batched by the server; "
                      "the clients run on the same machine",
            "load": f"{args.clients} concurrent clients x {args.requests} requests without heatmap, then "
                    f"{args.clients} x {args.heatmap_requests} with heatmap, over {len(images)} real X-rays",
        },
        "equality": f"class and flags exactly, probabilities within {TOLERANCE:g}, against one-at-a-time requests",
        "runs": runs,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
