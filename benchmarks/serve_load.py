"""Load benchmark of `cxrscreen serve`; prints one JSON object.

Starts the server (bundled model and gate, this checkout's sources) on 127.0.0.1 at a free port, sends
each of a fixed sample of real X-rays of ../shared/data/cxr once, one at a time, with and without heatmap
(the sequential references), then a bounded load: `--clients` concurrent clients sending `--requests`
requests each without heatmap, then `--heatmap-requests` each with heatmap, and stops the server. Reports
per phase p50 / p95 latency, requests/s, errors, whether every response equals the sequential one for the
same image (class and flags exactly, probabilities within 1e-5, the heatmap picture within one grey level),
the server's peak RSS (VmHWM), and the
load conditions (CPUs, load average before and after). By default it does this twice: with torch's own
thread count (one per core) and with one torch thread (`cxrscreen serve --threads 1`), which is faster
when the CPUs are shared (here: with the clients themselves).

`--engine onnxruntime` serves the bundled model's ONNX export instead (classification in ONNX Runtime, Grad-CAM
on the PyTorch weights beside it, loaded by the first heatmap request; the thread counts are then ONNX Runtime's
and, once loaded, PyTorch's). Before each run it starts a PyTorch-engine server with the same threads for its
one-at-a-time answers and reports whether the ONNX engine's one-at-a-time answers equal them (class and flags
exactly, probabilities within `ENGINE_TOLERANCE`, the picture within one grey level). Without `--engine` it runs
the PyTorch engine, as before.

    python benchmarks/serve_load.py > docs/results/serve_load.json
    python benchmarks/serve_load.py --engine onnxruntime > docs/results/serve_load_onnxruntime.json
    python benchmarks/serve_load.py --hostile --clients 4 --requests 40 > docs/results/serve_load_hostile.json

`--hostile` runs only the hostile phase (issue 21): normal requests beside clients uploading small
compressed TIFFs / DICOMs that decode to hundreds of MB and beside slow-header and slow-body sockets; it
reports the normal requests' latency, what the bombs got, whether the server closed every slow socket,
and the server's RSS before, during (sampled every 0.2 s), 10 s after, and its peak (VmHWM).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO / ".." / "shared" / "data" / "cxr").resolve()
TOLERANCE = 1e-5
ENGINE_TOLERANCE = 1e-4
"""Probabilities of ONNX Runtime against PyTorch (the export's parity tests use the same)."""
ENGINES = ("torch", "onnxruntime")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sample(data_dir: Path, n: int) -> list[Path]:
    """n real X-rays spread over the sorted manifest (every k-th), read in place."""
    m = pd.read_csv(data_dir / "manifest.csv").sort_values("image").reset_index(drop=True)
    idx = np.linspace(0, len(m) - 1, n).round().astype(int)
    return [data_dir / m["image"][i] for i in idx]


def _status_mb(pid: int, field: str) -> float | None:
    """A memory field of /proc/PID/status ("VmHWM": peak resident set, "VmRSS": resident now), MB; None where
    /proc is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a process, MB."""
    return _status_mb(pid, "VmHWM")


def _start_server(port: int, torch_threads: int | None, engine: str = "torch") -> subprocess.Popen:
    """The bundled model and gate served on `port` with `engine`; `torch_threads`: intra-op threads (torch's,
    or ONNX Runtime's and then PyTorch's for Grad-CAM; None: the library's default)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    if engine == "torch":
        threads = "" if torch_threads is None else f"import torch; torch.set_num_threads({int(torch_threads)}); "
        load = "from cxrscreen.serving.app import load_for_serving; run = load_for_serving(None, 'torch'); "
    else:  # as `cxrscreen serve --engine onnxruntime [--threads N]`: no torch until a heatmap needs it
        threads = ""
        load = ("from cxrscreen.predict.onnx_engine import load_for_engine; "
                f"run = load_for_engine(None, {engine!r}, threads={torch_threads!r}); ")
    code = (threads + "import sys, uvicorn; from cxrscreen.serving.app import create_app; "
            "from cxrscreen.serving.security import allowed_hosts_for, uvicorn_config; "
            "from cxrscreen.gate.model import gate_for_run; " + load + "app = create_app(run, "
            "gate=gate_for_run(run), allowed_hosts=allowed_hosts_for('127.0.0.1')); "
            f"uvicorn.Server(uvicorn_config(app, '127.0.0.1', {port}, log_level='warning')).run()")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def _served(torch_threads: int | None, engine: str) -> Iterator[tuple[str, int, subprocess.Popen]]:
    """(base URL, port, process) of a server started on a free port (`_start_server`), stopped on leaving."""
    port = _free_port()
    proc = _start_server(port, torch_threads, engine)
    try:
        yield f"http://127.0.0.1:{port}/", port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


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


def _same(a: dict[str, Any], b: dict[str, Any], tolerance: float = TOLERANCE) -> bool:
    """Class and flags exactly, probabilities within `tolerance`."""
    if a.get("class") != b.get("class") or a.get("flags") != b.get("flags"):
        return False
    pa, pb = a.get("probabilities"), b.get("probabilities")
    if pa is None or pb is None:
        return pa is pb
    return pa.keys() == pb.keys() and all(abs(pa[k] - pb[k]) <= tolerance for k in pa)


def _same_picture(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Both without a picture, or both pictures (base64 PNG) of one size within one grey level per pixel."""
    pa, pb = a.get("heatmap_png_base64"), b.get("heatmap_png_base64")
    if not pa or not pb:
        return not pa and not pb
    import base64

    import cv2

    ia, ib = (cv2.imdecode(np.frombuffer(base64.b64decode(p), np.uint8), cv2.IMREAD_COLOR) for p in (pa, pb))
    return ia is not None and ib is not None and ia.shape == ib.shape and int(
        np.abs(ia.astype(np.int16) - ib.astype(np.int16)).max()) <= 1


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
        return dt, status, ok and _same(body, refs[k]) and (not heatmap or (
            (body.get("class") is None or bool(body.get("heatmap_png_base64"))) and _same_picture(body, refs[k])))

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


def _sequential(client: Any, base: str, images: list[tuple[str, bytes]]
                ) -> tuple[list[dict], list[dict], list[float]]:
    """Each image sent once, one request at a time, without then with heatmap: (answers, answers with heatmap,
    latencies without heatmap in ms)."""
    refs, refs_hm, seq_lat = [], [], []
    for name, data in images:
        dt, status, body = _post(client, base, name, data, heatmap=False)
        if status != 200 or body is None:
            raise SystemExit(f"sequential request for {name} failed: HTTP {status}")
        refs.append(body)
        seq_lat.append(dt * 1000)
    for name, data in images:
        _, status, body = _post(client, base, name, data, heatmap=True)
        refs_hm.append(body if status == 200 and body is not None else {})
    return refs, refs_hm, seq_lat


def torch_references(images: list[tuple[str, bytes]], torch_threads: int | None) -> tuple[list[dict], list[dict]]:
    """The PyTorch engine's one-at-a-time answers (without, with heatmap) from a server of its own with
    `torch_threads` (the same count as the server compared: Grad-CAM's float sums depend on it, and a 3e-6
    difference moves a few pixels across a colour-map step)."""
    import httpx

    with _served(torch_threads, "torch") as (base, _, proc), httpx.Client() as client:
        _wait_ready(client, base, proc)
        refs, refs_hm, _ = _sequential(client, base, images)
    return refs, refs_hm


def _compare_engines(refs: list[dict], refs_hm: list[dict], torch_refs: tuple[list[dict], list[dict]]
                     ) -> dict[str, Any]:
    """This server's one-at-a-time answers against the PyTorch engine's for the same images."""
    plain = [_same(a, b, ENGINE_TOLERANCE) for a, b in zip(refs, torch_refs[0], strict=True)]
    heat = [_same(a, b, ENGINE_TOLERANCE) and _same_picture(a, b) for a, b in zip(refs_hm, torch_refs[1], strict=True)]
    return {"images": len(plain), "equal_without_heatmap": int(sum(plain)), "equal_with_heatmap": int(sum(heat)),
            "all_equal": all(plain) and all(heat),
            "equality": f"class and flags exactly, probabilities within {ENGINE_TOLERANCE:g}, the picture within "
                        "one grey level per pixel"}


def run_server_load(images: list[tuple[str, bytes]], *, clients: int, per_client: int, heatmap_per_client: int,
                    torch_threads: int | None, engine: str = "torch") -> dict[str, Any]:
    """Start a server, take the sequential references, run both load phases, stop it; the report. With an
    engine other than torch, a PyTorch-engine server with the same threads is run first (`torch_references`) and
    this server's one-at-a-time answers are compared with its."""
    torch_refs = torch_references(images, torch_threads) if engine != "torch" else None
    import httpx

    load_before = os.getloadavg()
    with _served(torch_threads, engine) as (base, _, proc):
        with httpx.Client() as client:
            _wait_ready(client, base, proc)
            model = client.get(base + "api/model").json()
            rss_before_requests = _peak_rss_mb(proc.pid)
            refs, refs_hm, seq_lat = _sequential(client, base, images)  # sequential references
            rss_after_warmup = _peak_rss_mb(proc.pid)
        plain = _phase(base, images, refs, clients * per_client, clients, heatmap=False)
        heat = _phase(base, images, refs_hm, clients * heatmap_per_client, clients, heatmap=True)
        peak = _peak_rss_mb(proc.pid)
    if engine == "torch":
        threads: dict[str, Any] = {"server_torch_threads": torch_threads or "torch default (one per core)"}
    else:
        threads = {"server_threads": torch_threads or "ONNX Runtime's and torch's default (one per core)"}
    report = {
        "engine": engine,
        **threads,
        "load_average_1_5_15_before": [round(v, 2) for v in load_before],
        "load_average_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
        "model": {"arch": model.get("arch"), "weights_sha256": (model.get("weights_sha256") or "")[:12],
                  "image_size": model.get("preprocess", {}).get("image_size")},
        "flagged_by_gate": sum(r["class"] is None for r in refs),
        "sequential_latency_ms_p50": round(float(np.percentile(seq_lat, 50)), 1),
        "without_heatmap": plain,
        "with_heatmap": heat,
        "server_peak_rss_mb": peak,
        "server_rss_mb_before_requests": rss_before_requests,
        "server_rss_mb_after_warmup": rss_after_warmup,
        "targets": {
            "zero_errors": plain["errors"] == 0 and heat["errors"] == 0,
            "all_equal_sequential": plain["all_equal_sequential"] and heat["all_equal_sequential"],
            "requests_per_s_ge_40": plain["requests_per_s"] >= 40,
            "p50_le_200_ms": plain["latency_ms_p50"] <= 200,
            "peak_rss_le_2_gb": peak is not None and peak <= 2048,
        },
    }
    if torch_refs is not None:
        report["sequential_vs_torch_engine"] = _compare_engines(refs, refs_hm, torch_refs)
        report["targets"]["equal_torch_engine_sequential"] = report["sequential_vs_torch_engine"]["all_equal"]
    return report


# ------------------------------------------------------------------------------------------- hostile phase


def _rss_mb(pid: int) -> float | None:
    """VmRSS (resident set now) of a process, MB."""
    return _status_mb(pid, "VmRSS")


def hostile_payloads() -> list[tuple[str, bytes]]:
    """Small files that decode to hundreds of MB: deflated TIFFs (32-bit integer, float, CMYK) at 7071^2
    (over the decoded-bytes limit: refused from the header) and 6000^2 (under it: decoded and reduced), and
    a deflated 7071^2 16-bit DICOM (98 KB)."""
    import io

    import pydicom
    from PIL import Image
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from cxrscreen.synthetic import write_dicom

    out = []
    for mode in ("I", "F", "CMYK"):
        for side in (7071, 6000):
            buf = io.BytesIO()
            Image.new(mode, (side, side)).save(buf, format="TIFF", compression="tiff_adobe_deflate")
            out.append((f"bomb_{mode}_{side}.tif", buf.getvalue()))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load_{os.getpid()}.dcm"
    try:
        write_dicom(tmp, np.zeros((7071, 7071), np.uint16), bits_stored=12)
        ds = pydicom.dcmread(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out.append(("bomb_16bit_7071.dcm", buf.getvalue()))
    return out


def _slow_socket(port: int, kind: str, stop: threading.Event, log: list[dict[str, Any]]) -> None:
    """A slow client: `header` sends its request head one byte a second, `body` sends a complete head
    announcing 100 KB then one body byte a second. Records how long the server kept it open."""
    t0 = time.monotonic()
    closed_by_server = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            head = b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            if kind == "body":
                s.sendall(head + b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n"
                          b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.png\"\r\n\r\n")
            else:
                s.sendall(head[:20])
            s.settimeout(1.0)
            while not stop.is_set():
                try:
                    s.sendall(b"x")
                    if s.recv(4096) == b"":
                        closed_by_server = True
                        break
                except TimeoutError:
                    continue
                except OSError:
                    closed_by_server = True
                    break
    except OSError:
        closed_by_server = True
    log.append({"kind": kind, "open_s": round(time.monotonic() - t0, 1), "closed_by_server": closed_by_server})


def run_hostile(images: list[tuple[str, bytes]], *, clients: int, per_client: int, bomb_clients: int,
                slow_sockets: int, torch_threads: int | None, engine: str = "torch") -> dict[str, Any]:
    """Normal traffic (`clients` x `per_client` real X-rays) alone, then again while `bomb_clients` threads upload the
    hostile payloads in a loop and `slow_sockets` slow-header plus as many slow-body connections are held
    open; the server's RSS sampled every 0.2 s, and again 10 s after the burst."""
    import httpx

    bombs = hostile_payloads()
    load_before = os.getloadavg()
    with _served(torch_threads, engine) as (base, port, proc):
        stop = threading.Event()
        stop_slow = threading.Event()
        rss: list[float] = []
        bomb_status: dict[str, dict[str, int]] = {}
        slow_log: list[dict[str, Any]] = []
        try:
            with httpx.Client() as client:
                _wait_ready(client, base, proc)
                refs = []
                for name, data in images:
                    _, status, body = _post(client, base, name, data, heatmap=False)
                    refs.append(body if status == 200 and body is not None else {})
            rss_before = _rss_mb(proc.pid)
            baseline = _phase(base, images, refs, clients * per_client, clients, heatmap=False)  # no hostile traffic

            def sample() -> None:
                while not stop.is_set():
                    v = _rss_mb(proc.pid)
                    if v is not None:
                        rss.append(v)
                    time.sleep(0.2)

            def bomber(k: int) -> None:
                with httpx.Client() as c:
                    i = k
                    while not stop.is_set():
                        name, data = bombs[i % len(bombs)]
                        _, status, _ = _post(c, base, name, data, heatmap=False)
                        counts = bomb_status.setdefault(name, {})
                        counts[str(status)] = counts.get(str(status), 0) + 1
                        i += 1

            threads = [threading.Thread(target=sample, daemon=True)]
            threads += [threading.Thread(target=bomber, args=(k,), daemon=True) for k in range(bomb_clients)]
            slow = [threading.Thread(target=_slow_socket, args=(port, kind, stop_slow, slow_log), daemon=True)
                    for kind in ("header", "body") for _ in range(slow_sockets)]
            for t in threads + slow:
                t.start()
            time.sleep(2.0)  # the bombs and slow sockets are in place
            normal = _phase(base, images, refs, clients * per_client, clients, heatmap=False)
            stop.set()
            for t in threads:
                t.join(30)
            rss_peak_during = max(rss) if rss else None
            time.sleep(10.0)
            rss_after = _rss_mb(proc.pid)
            peak = _peak_rss_mb(proc.pid)
            deadline = time.monotonic() + 80  # the server's body deadline is 60 s
            while time.monotonic() < deadline and any(t.is_alive() for t in slow):
                time.sleep(0.5)
            stop_slow.set()
            for t in slow:
                t.join(5)
        finally:
            stop.set()
            stop_slow.set()
    slow = {kind: {"sockets": sum(r["kind"] == kind for r in slow_log),
                   "closed_by_server": sum(r["kind"] == kind and r["closed_by_server"] for r in slow_log),
                   "max_open_s_when_closed": max([r["open_s"] for r in slow_log
                                                  if r["kind"] == kind and r["closed_by_server"]], default=None)}
            for kind in ("header", "body")}
    return {
        "engine": engine,
        "server_torch_threads": torch_threads or "torch default (one per core)",
        "load_average_1_5_15_before": [round(v, 2) for v in load_before],
        "load_average_1_5_15_after": [round(v, 2) for v in os.getloadavg()],
        "normal_traffic_alone": baseline,
        "normal_traffic": normal,
        "bomb_clients": bomb_clients,
        "bomb_payload_bytes": {n: len(d) for n, d in bombs},
        "bomb_responses": bomb_status,
        "slow_clients": slow,
        "server_rss_mb_before": rss_before,
        "server_rss_mb_peak_during": rss_peak_during,
        "server_rss_mb_10s_after": rss_after,
        "server_peak_rss_mb_vmhwm": peak,
        "targets": {
            "normal_p95_le_1_s": normal["latency_ms_p95"] <= 1000,
            "normal_zero_errors": normal["errors"] == 0,
            "peak_rss_le_2_gb": peak is not None and peak <= 2048,
            "every_slow_socket_closed": all(v["closed_by_server"] == v["sockets"] for v in slow.values()),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--images", type=int, default=64, help="distinct real X-rays sent")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200, help="requests per client without heatmap")
    ap.add_argument("--heatmap-requests", type=int, default=50, help="requests per client with heatmap")
    ap.add_argument("--engine", choices=ENGINES, default="torch",
                    help="the server's engine (onnxruntime: the bundled model's ONNX export, compared with a "
                         "PyTorch-engine server's one-at-a-time answers)")
    ap.add_argument("--torch-threads", type=int, action="append", default=None,
                    help="intra-op threads in the server (torch's; with --engine onnxruntime ONNX Runtime's and, "
                         "for Grad-CAM, torch's), repeatable: one server run per value (default: the library's "
                         "own, one per core, then 1)")
    ap.add_argument("--note", default=None, help="free text about the machine's load, kept in the JSON")
    ap.add_argument("--hostile", action="store_true",
                    help="only the hostile phase: --clients x --requests normal requests while --bomb-clients "
                         "upload decompression-bomb TIFFs / DICOMs and --slow-sockets slow-header and slow-body "
                         "connections are held open")
    ap.add_argument("--bomb-clients", type=int, default=8)
    ap.add_argument("--slow-sockets", type=int, default=50, help="slow-header sockets, and as many slow-body")
    args = ap.parse_args(argv)

    if not (args.data / "manifest.csv").is_file():
        raise SystemExit(f"real data not found at {args.data}")
    images = [(p.name, p.read_bytes()) for p in _sample(args.data, args.images)]
    if args.hostile:
        t = (args.torch_threads or [1])[0]
        report = {
            "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "conditions": {"cpus": os.cpu_count(), "python": platform.python_version(), "note": args.note,
                           "server": "uvicorn with cxrscreen's config (serving/security.py), one process, bundled "
                                     "model and gate; clients on the same machine",
                           "load": f"{args.clients} clients x {args.requests} normal requests over {len(images)} "
                                   f"real X-rays, beside {args.bomb_clients} clients uploading bombs in a loop and "
                                   f"{args.slow_sockets} slow-header + {args.slow_sockets} slow-body sockets"},
            "hostile": run_hostile(images, clients=args.clients, per_client=args.requests,
                                   bomb_clients=args.bomb_clients, slow_sockets=args.slow_sockets, torch_threads=t,
                                   engine=args.engine),
        }
        print(json.dumps(report, indent=1))
        return 0
    settings = args.torch_threads or [None, 1]
    runs = [run_server_load(images, clients=args.clients, per_client=args.requests,
                            heatmap_per_client=args.heatmap_requests, torch_threads=t, engine=args.engine)
            for t in settings]
    report = {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "conditions": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": args.note,
            "engine": args.engine,
            "server": "uvicorn, one process, bundled model and gate, forward passes batched by the server; "
                      "the clients run on the same machine",
            "load": f"{args.clients} concurrent clients x {args.requests} requests without heatmap, then "
                    f"{args.clients} x {args.heatmap_requests} with heatmap, over {len(images)} real X-rays",
        },
        "equality": f"class and flags exactly, probabilities within {TOLERANCE:g}, and with heatmap the picture within "
                "one grey level per pixel, against one-at-a-time requests",
        "runs": runs,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
