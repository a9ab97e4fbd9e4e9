"""The bundled model's ONNX export (src/cxrscreen/weights/model.onnx): checksum-guarded, the same model, and the same
probabilities as the PyTorch weights it was exported from (generated images only)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrscreen.io.files import file_sha256
from cxrscreen.predict.predictor import Predictor, default_model_dir, load_model
from tests.conftest import synthetic_cxr

pytest.importorskip("onnxruntime")


def test_bundled_onnx_matches_its_checksum_and_config() -> None:
    from cxrscreen.predict.onnx_engine import read_onnx_metadata

    d = default_model_dir()
    cfg = json.loads((d / "config.json").read_text())
    assert (d / "model.onnx").is_file(), "the bundled model ships its ONNX export"
    assert file_sha256(d / "model.onnx") == cfg["onnx_sha256"]
    meta = read_onnx_metadata(d / "model.onnx")
    assert meta["weights_sha256"] == cfg["weights_sha256"]
    assert float(meta["temperature"]) == pytest.approx(cfg["calibration"]["temperature"])


def test_bundled_onnx_gives_the_pytorch_probabilities() -> None:
    from cxrscreen.predict.onnx_engine import load_bundled_onnx

    torch_pred = Predictor(load_model(None))
    onnx_pred = Predictor(load_bundled_onnx(default_model_dir(), threads=1))
    raw = [synthetic_cxr(260, 220, lesion=(120, 70) if k % 2 else None, seed=k) for k in range(4)]
    images = [torch_pred.preprocess(r)[0] for r in raw]
    p_torch, p_onnx = torch_pred.probabilities(images), onnx_pred.probabilities(images)
    assert np.allclose(p_torch, p_onnx, atol=1e-3), float(np.abs(p_torch - p_onnx).max())
