"""Heatmaps with the ONNX Runtime engine: the class and probabilities are ONNX Runtime's, Grad-CAM runs on the
PyTorch model beside the export (loaded on the first heatmap, once), and the picture equals the PyTorch engine's;
classification imports no torch; a bare .onnx file refuses heatmaps with a clear error (server and CLI)."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.errors import CXRError
from cxrscreen.predict.onnx_engine import OnnxLoadedRun, drawing_run, heatmap_problem, load_for_engine
from cxrscreen.predict.onnx_export import export_onnx
from cxrscreen.runs.run_dir import load_run
from cxrscreen.serving import create_app
from tests.batch_fixtures import make_tiny_run, write_images
from tests.processes import run_fresh_python

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a tiny run directory holding its own model.onnx export, a bare copy of that .onnx file elsewhere)."""
    d = tmp_path_factory.mktemp("onnxcam")
    run_dir = make_tiny_run(d / "run")
    export_onnx(load_run(run_dir), run_dir / "model.onnx")
    bare = d / "bare" / "tiny.onnx"
    bare.parent.mkdir()
    shutil.copy(run_dir / "model.onnx", bare)
    return run_dir, bare


def _png(seed: int = 0, h: int = 180, w: int = 160) -> bytes:
    """A synthetic grey PNG (never a real patient image)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w)) * 200).astype(np.uint8)
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 5, 240, -1)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _post(client: TestClient, data: bytes, **params: Any) -> Any:
    return client.post("/api/predict", params=params, files={"file": ("chest.png", data, "image/png")})


def _decode(b64: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def test_server_heatmap_with_onnx_engine_equals_the_pytorch_engine(exported: tuple[Path, Path]) -> None:
    """Failed before: the ONNX engine refused every heatmap request (422)."""
    run_dir, _ = exported
    onnx_run = load_for_engine(run_dir, "onnxruntime", threads=1)
    assert isinstance(onnx_run, OnnxLoadedRun) and heatmap_problem(onnx_run) is None
    torch_client = TestClient(create_app(load_run(run_dir)))
    onnx_client = TestClient(create_app(onnx_run))  # no gate on either side: every image gets a heatmap
    for seed, target in ((0, None), (1, None), (2, "pneumonia")):
        params = {"heatmap": "true", **({"target": target} if target else {})}
        a, b = _post(torch_client, _png(seed), **params), _post(onnx_client, _png(seed), **params)
        assert a.status_code == 200 and b.status_code == 200, b.text
        a, b = a.json(), b.json()
        assert a["class"] == b["class"] and a["heatmap_target"] == b["heatmap_target"]
        assert b["heatmap_target"] == (target or b["class"])  # the class the user sees, ONNX Runtime's
        assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) < PARITY_TOL
        ia, ib = _decode(a["heatmap_png_base64"]), _decode(b["heatmap_png_base64"])
        assert ia.shape == ib.shape and int(np.abs(ia.astype(int) - ib.astype(int)).max()) <= 1
        assert b["heatmap_in_lungs"] == pytest.approx(a["heatmap_in_lungs"], abs=1e-3)


def test_bare_onnx_file_refuses_heatmaps_clearly(exported: tuple[Path, Path]) -> None:
    _, bare = exported
    run = load_for_engine(bare, "onnxruntime", threads=1)
    problem = heatmap_problem(run)
    assert problem is not None and "bare .onnx file" in problem and "model.safetensors" in problem
    with pytest.raises(CXRError, match="PyTorch weights beside the ONNX export") as exc:
        drawing_run(run)
    assert "tiny.onnx" in str(exc.value)
    client = TestClient(create_app(run, gate=run.embedded_gate))
    assert _post(client, _png()).status_code == 200  # classification still works
    r = _post(client, _png(), heatmap="true")
    assert r.status_code == 422 and "bare .onnx file" in r.json()["error"]


def test_export_beside_other_weights_refuses_heatmaps(exported: tuple[Path, Path], tmp_path: Path) -> None:
    """An .onnx export copied into another run's directory is not explained by that run's weights."""
    run_dir, bare = exported
    other = make_tiny_run(tmp_path / "other", seed=1)
    shutil.copy(bare, other / "model.onnx")
    run = load_for_engine(other, "onnxruntime", threads=1)
    assert "not the ones it was exported from" in (heatmap_problem(run) or "")


def test_pytorch_model_loads_once_for_concurrent_first_heatmaps(exported: tuple[Path, Path]) -> None:
    run_dir, _ = exported
    run = load_for_engine(run_dir / "model.onnx", "onnxruntime", threads=1)
    got: list[Any] = []
    threads = [threading.Thread(target=lambda: got.append(run.pytorch_run())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(g is got[0] for g in got)
    assert not getattr(got[0].model, "takes_numpy", False)  # the PyTorch model


def test_onnx_server_imports_torch_only_for_the_first_heatmap(exported: tuple[Path, Path]) -> None:
    """In a fresh process: the model info and classification requests to the ONNX engine's app import no torch
    (failed before: `/api/model`'s severity info did); the first heatmap request loads it and gets its picture."""
    run_dir, _ = exported
    code = (
        "import base64, json, sys\n"
        "import cv2, numpy as np\n"
        "from fastapi.testclient import TestClient\n"
        "from cxrscreen.predict.onnx_engine import load_for_engine\n"
        "from cxrscreen.serving import create_app\n"
        "def torch_mods():\n"
        "    return sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        f"run = load_for_engine({str(run_dir)!r}, 'onnxruntime', threads=1)\n"
        "client = TestClient(create_app(run, gate=run.embedded_gate))\n"
        "ok, buf = cv2.imencode('.png', (np.arange(160 * 140) % 251).reshape(160, 140).astype(np.uint8))\n"
        "files = {'file': ('chest.png', buf.tobytes(), 'image/png')}\n"
        "plain = [client.get('/api/model').status_code]  # what the page asks first\n"
        "plain += [client.post('/api/predict', files=files).status_code for _ in range(3)]\n"
        "before = torch_mods()\n"
        "r = client.post('/api/predict', params={'heatmap': 'true'}, files=files)\n"
        "print(json.dumps({'plain': plain, 'before': before, 'status': r.status_code,\n"
        "                  'picture': bool(r.json().get('heatmap_png_base64')), 'after': len(torch_mods())}))\n"
    )
    out = run_fresh_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["plain"] == [200, 200, 200, 200] and got["before"] == []
    assert got["status"] == 200 and got["picture"] and got["after"] > 0


def test_predict_heatmap_with_onnx_engine(exported: tuple[Path, Path], tmp_path: Path) -> None:
    """`predict --engine onnxruntime --heatmap` writes the PyTorch engine's pictures (failed before: exit 2);
    with a bare .onnx file it exits 2 saying why."""
    run_dir, bare = exported
    folder = tmp_path / "scans"
    write_images(folder, 3, bad=0)
    outs: dict[str, list[dict[str, Any]]] = {}
    for engine, model in (("torch", run_dir), ("onnxruntime", run_dir / "model.onnx")):
        r = CliRunner().invoke(app, ["predict", str(folder), "--json", "--model", str(model), "--engine", engine,
                                     "--heatmap", str(tmp_path / engine)])
        assert r.exit_code == 0, r.output
        outs[engine] = [json.loads(line) for line in r.stdout.splitlines()]
    for a, b in zip(outs["torch"], outs["onnxruntime"], strict=True):
        assert a["class"] == b["class"] and a["heatmap"] and b["heatmap"]
        ia, ib = cv2.imread(a["heatmap"]), cv2.imread(b["heatmap"])
        assert ia.shape == ib.shape and int(np.abs(ia.astype(int) - ib.astype(int)).max()) <= 1
    r = CliRunner().invoke(app, ["predict", str(folder), "--model", str(bare), "--engine", "onnxruntime",
                                 "--heatmap", str(tmp_path / "h")])
    assert r.exit_code == 2 and "bare .onnx file" in " ".join(r.stderr.split())


def test_dicom_out_secondary_capture_with_onnx_engine(exported: tuple[Path, Path], tmp_path: Path) -> None:
    """`--dicom-out` with the ONNX engine writes the heatmap Secondary Capture beside the SR when the PyTorch
    weights lie beside the export (before: the SR only); a bare .onnx file writes the SR and says why not the SC."""
    import pydicom

    from tests.conftest import synthetic_cxr
    from tests.dicom_fixtures import write_dx

    run_dir, bare = exported
    dx = write_dx(tmp_path / "in" / "dx.dcm", synthetic_cxr(260, 240, seed=3))
    for model, want in ((run_dir / "model.onnx", ["OT", "SR"]), (bare, ["SR"])):
        out = tmp_path / f"out_{len(want)}"
        r = CliRunner().invoke(app, ["predict", str(dx), "--model", str(model), "--engine", "onnxruntime",
                                     "--json", "--dicom-out", str(out)])
        assert r.exit_code == 0, r.output
        assert sorted(pydicom.dcmread(p).Modality for p in out.iterdir()) == want
    assert "no heatmap Secondary Capture" in " ".join(r.stderr.split())
