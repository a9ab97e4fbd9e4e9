"""The gate's opt-in lungs rule: two lungs of plausible size, off unless asked for."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrscreen.gate.model import Gate, bundled_gate_path
from cxrscreen.io.xray import XRay
from cxrscreen.lungs import segmenter
from cxrscreen.lungs.segmenter import LungResult
from tests.conftest import synthetic_cxr


class FixedLungs:
    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def segment(self, pixels: np.ndarray) -> LungResult:
        return LungResult(self.mask)


def _gate() -> Gate:
    path = bundled_gate_path()
    assert path is not None
    return Gate.from_json(path)


def test_lungs_rule_flags_a_missing_or_tiny_lung(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = _gate()
    mask = np.zeros((100, 100), np.uint8)
    mask[20:80, 10:45] = 1
    mask[20:80, 55:90] = 2
    monkeypatch.setattr(segmenter, "_BUNDLED", FixedLungs(mask))
    xray = XRay(np.zeros((100, 100), np.float32), "x.png", {})
    assert gate.lung_flags(xray) == []
    mask[mask == 2] = 0
    mask[50, 60] = 2  # one pixel: 0.01 % of the image
    (msg,) = gate.lung_flags(xray)
    assert "two lungs of plausible size not found" in msg and "left 0.0 %" in msg


def test_lungs_rule_is_opt_in_and_runs_after_the_other_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = _gate()
    monkeypatch.setattr(segmenter, "_BUNDLED", FixedLungs(np.zeros((50, 50), np.uint8)))
    monkeypatch.setattr(Gate, "rules", lambda self, xray: [])
    monkeypatch.setattr(Gate, "scores", lambda self, xray: {"p": 0.0, "novelty": -1e9})
    xray = XRay(np.zeros((50, 50), np.float32), "x.png", {})
    assert not gate.lungs_rule and gate.flags(xray) == []
    gate.lungs_rule = True
    assert gate.flags(xray)[0].startswith("two lungs")
    monkeypatch.setattr(Gate, "rules", lambda self, xray: ["a blank image"])
    assert gate.flags(xray) == ["a blank image"]  # refused already: no segmentation


def test_lungs_rule_round_trips() -> None:
    gate = _gate()
    gate.lungs_rule, gate.min_lung_fraction = True, 0.03
    back = Gate.from_dict(gate.to_dict())
    assert back.lungs_rule and back.min_lung_fraction == 0.03
    d = gate.to_dict()
    del d["lungs_rule"], d["min_lung_fraction"]
    assert not Gate.from_dict(d).lungs_rule  # gate files written before the rule: off


class BatchLungs(FixedLungs):
    """FixedLungs that also segments a batch, recording the batch sizes."""

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__(mask)
        self.batches: list[int] = []

    def segment_many(self, pixels: list[np.ndarray]) -> list[LungResult]:
        self.batches.append(len(pixels))
        return [LungResult(self.mask) for _ in pixels]


def _two_lungs(n: int = 100) -> np.ndarray:
    mask = np.zeros((n, n), np.uint8)
    mask[20:80, 10:45] = 1
    mask[20:80, 55:90] = 2
    return mask


def test_flags_many_segments_what_passes_the_other_rules_as_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = _gate()
    gate.lungs_rule = True
    fake = BatchLungs(_two_lungs())
    monkeypatch.setattr(segmenter, "_BUNDLED", fake)
    monkeypatch.setattr(Gate, "rules", lambda self, xray: ["a blank image"] if xray.path == "blank.png" else [])
    monkeypatch.setattr(Gate, "scores", lambda self, xray: {"p": 0.0, "novelty": -1e9})
    xrays = [XRay(np.zeros((100, 100), np.float32), f"{i}.png", {}) for i in range(4)]
    xrays.insert(2, XRay(np.zeros((100, 100), np.float32), "blank.png", {}))
    out = gate.flags_many(xrays)
    assert fake.batches == [4]  # one batch, without the image refused already
    assert out == [gate.flags(x) for x in xrays] and out[2] == ["a blank image"]
    fake.mask[fake.mask == 2] = 0
    assert all(f[0].startswith("two lungs") for i, f in enumerate(gate.flags_many(xrays)) if i != 2)


def test_predict_segments_each_batch_once_with_the_lungs_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cxrscreen.gate.model import gate_for_run
    from cxrscreen.predict.predictor import Predictor, load_model

    fake = BatchLungs(_two_lungs())
    monkeypatch.setattr(segmenter, "_BUNDLED", fake)
    run = load_model(None)
    gate = gate_for_run(run)
    gate.lungs_rule = True
    monkeypatch.setattr(Gate, "flags_before_lungs", lambda self, xray: [])
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(files[-1]), (synthetic_cxr(160, 140) * 255).astype(np.uint8))
    results = [r for r, _ in Predictor(run, gate=gate, batch_size=3).predict_files(files)]
    assert fake.batches == [3, 2] and all(r.flags == [] for r in results)
