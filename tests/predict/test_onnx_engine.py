"""ONNX export and the ONNX Runtime engine: metadata, dynamic batch, parity with PyTorch (synthetic and real
images), `predict --engine onnxruntime`, the server with the ONNX engine, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.errors import CXRError
from cxrscreen.io.xray import read_xray
from cxrscreen.predict.onnx_engine import OnnxModel, load_for_engine, load_onnx_run, read_onnx_metadata
from cxrscreen.predict.onnx_export import export_onnx
from cxrscreen.predict.predictor import Predictor, load_model
from cxrscreen.runs.run_dir import load_run
from tests.batch_fixtures import make_tiny_run, write_images
from tests.conftest import read_real_manifest
from tests.processes import run_fresh_python

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, its .onnx export) of a random-init EfficientNet-Lite0 at 64 px (depthwise convolutions)."""
    d = tmp_path_factory.mktemp("onnx")
    run_dir = make_tiny_run(d / "run")
    info = export_onnx(load_run(run_dir), d / "export" / "tiny.onnx")
    assert info["max_abs_diff_probabilities"] < PARITY_TOL
    return run_dir, Path(info["path"])


def _probabilities(predictor: Predictor, images: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([predictor.probabilities(images[i:i + 7]) for i in range(0, len(images), 7)])


def test_metadata_carries_what_serving_needs(tiny: tuple[Path, Path]) -> None:
    run_dir, onnx_file = tiny
    meta = read_onnx_metadata(onnx_file)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert json.loads(meta["classes"]) == cfg["classes"]
    assert json.loads(meta["preprocess"]) == cfg["preprocess"]
    assert float(meta["temperature"]) == 1.5 and json.loads(meta["decision"]) == {"rule": "argmax"}
    assert meta["weights_sha256"] == cfg["weights_sha256"]
    gate = json.loads(meta["gate"])
    assert gate["p_threshold"] == 1.0  # the run's own gate.json, not the bundled one
    onnx_run = load_onnx_run(onnx_file)
    assert onnx_run.classes == cfg["classes"] and onnx_run.temperature == 1.5
    assert onnx_run.preprocess.image_size == 64 and onnx_run.embedded_gate.p_threshold == 1.0


def test_dynamic_batch_and_parity_with_pytorch(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, onnx_file = tiny
    module = OnnxModel(onnx_file, threads=1)
    for n in (1, 5):
        out = module.run(np.zeros((n, 1, 64, 64), np.float32))
        assert out["logits"].shape == (n, 3) and out["probabilities"].shape == (n, 3)
    files = write_images(tmp_path / "img", 12, bad=0)
    torch_pred, onnx_pred = Predictor(load_run(run_dir)), Predictor(load_onnx_run(onnx_file))
    images = [torch_pred.prepare(read_xray(f)).image for f in files]
    p_torch, p_onnx = _probabilities(torch_pred, images), _probabilities(onnx_pred, images)
    assert np.abs(p_torch - p_onnx).max() < PARITY_TOL
    # the graph's own probabilities output applies the same temperature
    x = torch.stack([torch.as_tensor(im).float().div(255).sub(0.5).div(0.25).unsqueeze(0) for im in images])
    assert np.abs(module.run(x.numpy())["probabilities"] - p_torch).max() < PARITY_TOL


def test_predict_and_export_commands(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, _ = tiny
    onnx_file = tmp_path / "cli.onnx"
    res = CliRunner().invoke(app, ["export", "--model", str(run_dir), "--format", "onnx", "--out", str(onnx_file)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["max_abs_diff_probabilities"] < PARITY_TOL
    folder = tmp_path / "scans"
    write_images(folder, 6, bad=1)
    outs = {}
    for engine, model in (("torch", run_dir), ("onnxruntime", onnx_file)):
        r = CliRunner().invoke(app, ["predict", str(folder), "--json", "--model", str(model), "--engine", engine])
        assert r.exit_code == 1, r.output  # the broken file
        outs[engine] = [json.loads(line) for line in r.stdout.splitlines()]
    assert [r["path"] for r in outs["torch"]] == [r["path"] for r in outs["onnxruntime"]]
    for a, b in zip(outs["torch"], outs["onnxruntime"], strict=True):
        assert a["class"] == b["class"] and a["error"] == b["error"]
        if a["probabilities"]:
            assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) < PARITY_TOL
    r = CliRunner().invoke(app, ["predict", str(folder), "--model", str(onnx_file), "--engine", "onnxruntime",
                                 "--heatmap", str(tmp_path / "h")])
    assert r.exit_code == 2 and "bare .onnx file" in " ".join(r.stderr.split())  # no weights beside it
    r = CliRunner().invoke(app, ["export", "--model", str(run_dir), "--format", "tflite", "--out", "x"])
    assert r.exit_code == 2 and "onnx" in r.stderr


def test_server_runs_the_onnx_engine(tiny: tuple[Path, Path]) -> None:
    import cv2

    from cxrscreen.serving import create_app
    from tests.conftest import synthetic_cxr

    _, onnx_file = tiny
    run = load_for_engine(onnx_file, "onnxruntime", threads=1)
    client = TestClient(create_app(run, gate=run.embedded_gate))
    ok, buf = cv2.imencode(".png", (synthetic_cxr(200, 180) * 255).astype(np.uint8))
    files = {"file": ("chest.png", buf.tobytes(), "image/png")}
    r = client.post("/api/predict", files=files)
    assert r.status_code == 200, r.text
    assert abs(sum(r.json()["probabilities"].values()) - 1) < 1e-5
    assert client.get("/api/model").json()["temperature"] == 1.5
    r = client.post("/api/predict", params={"heatmap": "true"}, files=files)
    assert r.status_code == 422 and "PyTorch engine" in r.json()["error"]


def test_bad_models_give_clear_errors(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    run_dir, onnx_file = tiny
    with pytest.raises(CXRError, match="not found"):
        load_onnx_run(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(CXRError, match="cannot load") as exc:
        load_onnx_run(junk)
    assert "junk.onnx" in str(exc.value)
    with pytest.raises(CXRError, match="engine onnxruntime"):
        load_for_engine(onnx_file, "torch")
    with pytest.raises(CXRError, match="unknown engine"):
        load_for_engine(run_dir, "tensorrt")
    r = CliRunner().invoke(app, ["predict", str(run_dir / "config.json"), "--engine", "onnxruntime",
                                 "--model", str(run_dir)])
    assert r.exit_code == 2 and "model.onnx" in r.stderr and "not found" in r.stderr


@pytest.mark.slow
def test_bundled_model_parity_on_real_images(data_dir: Path, tmp_path: Path) -> None:
    """Probabilities of the exported bundled model within 1e-4 of PyTorch's on 48 real X-rays (12 per source)."""
    df = read_real_manifest(data_dir)
    rows = pd.concat([g.head(12) for _, g in df.groupby("source")])
    files = [data_dir / p for p in rows["image"]]
    run = load_model(None)
    export_onnx(run, tmp_path / "bundled.onnx")
    torch_pred, onnx_pred = Predictor(run), Predictor(load_onnx_run(tmp_path / "bundled.onnx"))
    images = [torch_pred.prepare(read_xray(f)).image for f in files]
    diff = float(np.abs(_probabilities(torch_pred, images) - _probabilities(onnx_pred, images)).max())
    print(f"max |p_onnxruntime - p_torch| over {len(files)} real images: {diff:.2e}")
    assert diff < PARITY_TOL


def test_onnx_engine_predicts_without_torch(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Loading an .onnx export and predicting files with it imports neither torch nor torchvision (a fresh
    process), and gives the probabilities the PyTorch engine gives in this one."""

    run_dir, onnx_file = tiny
    files = write_images(tmp_path / "img", 4, bad=0)
    code = (
        "import json, sys\n"
        "from cxrscreen.predict.onnx_engine import load_for_engine\n"
        "from cxrscreen.predict.predictor import Predictor\n"
        f"run = load_for_engine({str(onnx_file)!r}, 'onnxruntime', threads=1)\n"
        f"res = [r for r, _ in Predictor(run).predict_files({[str(f) for f in files]!r})]\n"
        "print(json.dumps({'torch': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')),"
        " 'probs': [r.probabilities for r in res]}))\n"
    )
    out = run_fresh_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] == []
    expected = [r.probabilities for r, _ in Predictor(load_run(run_dir)).predict_files(files)]
    for a, b in zip(got["probs"], expected, strict=True):
        assert max(abs(a[c] - b[c]) for c in a) < PARITY_TOL


def test_predict_command_with_onnxruntime_loads_no_torch(tmp_path: Path) -> None:
    """`cxrscreen predict IMAGE --engine onnxruntime` (the bundled export) runs without importing torch: the
    command itself (options, severity helpers, writers) must not pull it in either."""

    img = write_images(tmp_path / "img", 1, size=(256, 256), bad=0)[0]
    code = (
        "import sys, json\n"
        "from cxrscreen.cli import app\n"
        "try:\n"
        f"    app(['predict', {str(img)!r}, '--engine', 'onnxruntime', '--threads', '1', '--json'],\n"
        "        standalone_mode=False)\n"
        "finally:\n"
        "    print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))))\n"
    )
    out = run_fresh_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    first = json.loads(lines[0])
    assert first["path"] == str(img) and first["error"] is None  # predicted (or withheld by the gate), not failed
    assert json.loads(lines[-1]) == []
