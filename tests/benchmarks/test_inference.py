"""Helpers of benchmarks/inference.py (the benchmark itself runs on real data, by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "inference.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_inference", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_latency_stats(bench):
    s = bench.latency_stats([float(v) for v in range(100, 0, -1)])  # 1..100 ms, unsorted
    assert s == {"latency_ms_median": 50.5, "latency_ms_p95": 95.0}


def test_audit_records_only_network_events(bench):
    bench.network_attempts.clear()
    bench._audit("socket.bind", (None, ("::1", 0)))  # local probe done by requests/urllib3 on import
    bench._audit("open", ("x", "r", 0))
    bench._audit("socket.connect", (None, ("example.org", 443)))
    assert len(bench.network_attempts) == 1 and bench.network_attempts[0].startswith("socket.connect")
    bench.network_attempts.clear()


def test_xrv_read_rgb_takes_first_channel(bench, tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    import skimage.io
    import torchvision

    rgb = np.zeros((60, 100, 3), np.uint8)
    rgb[..., 0] = 255  # only the first channel is bright
    skimage.io.imsave(tmp_path / "a.png", rgb, check_contrast=False)
    tf = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(32)])
    out = bench.xrv_read(tmp_path / "a.png", tf)
    assert out.shape == (1, 32, 32) and out.dtype == np.float32
    assert np.allclose(out, 1024.0)
