"""The bundled default model: loads offline, is checksum-guarded, and predicts without --model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha256
from cxrscreen.predict.inputs import iter_image_files
from cxrscreen.predict.predictor import default_model_dir, load_model
from cxrscreen.predict.prepared import format_probabilities
from cxrscreen.runs.run_dir import load_run
from tests.conftest import synthetic_cxr


@pytest.fixture()
def xray_png(tmp_path: Path) -> Path:
    path = tmp_path / "chest.png"
    cv2.imwrite(str(path), (synthetic_cxr(300, 260) * 65535).astype(np.uint16))
    return path


def test_bundled_model_is_small_and_matches_its_checksum():
    d = default_model_dir()
    cfg = json.loads((d / "config.json").read_text())
    assert (d / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    assert file_sha256(d / "model.safetensors") == cfg["weights_sha256"]
    assert (d / "MODEL_CARD.md").is_file() and (d / "model_card.json").is_file()
    run = load_model(None)
    assert run.classes == ["covid", "normal", "pneumonia"]


def test_corrupted_weights_are_refused(tmp_path: Path):
    copy = tmp_path / "weights"
    shutil.copytree(default_model_dir(), copy)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CXRError, match="checksum mismatch"):
        load_run(copy)


def test_predict_without_model_uses_the_bundled_one(xray_png: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    import cxrscreen.cli.predict

    # the synthetic image is no chest X-ray to the gate (no diagnosis, no heatmap): this test is about the model
    monkeypatch.setattr(cxrscreen.cli.predict, "_load_gate", lambda run: None)
    res = CliRunner().invoke(app, ["predict", str(xray_png), "--json", "--heatmap", str(tmp_path / "hm")])
    assert res.exit_code == 0, res.output
    row = json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][0])
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
    heat = cv2.imread(row["heatmap"])
    assert heat.shape[1] == 260 and heat.shape[0] > 300  # the input's size, and a caption band above it
    assert 0 <= row["heatmap_in_lungs"] <= 1


def test_folder_walk_and_formatting(tmp_path: Path, xray_png: Path):
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in iter_image_files([tmp_path])] == ["chest.png"]
    assert format_probabilities({"covid": 0.548, "normal": 0.27, "pneumonia": 0.182}) == (
        "covid 54.8 %, normal 27.0 %, pneumonia 18.2 %"
    )


def test_bundled_model_is_channels_last_and_gives_the_contiguous_outputs():
    """load_run keeps the weights channels-last (twice the CPU speed for depthwise convolutions); the
    probabilities equal those of the same weights in the default layout."""
    import copy

    import torch

    from cxrscreen.predict.predictor import load_model

    run = load_model()
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(run.model).to(memory_format=torch.contiguous_format)
    size = run.preprocess.image_size
    x = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(run.model(x).softmax(1), plain(x).softmax(1), atol=1e-5)
