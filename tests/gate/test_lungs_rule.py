"""The gate's opt-in lungs rule: two lungs of plausible size, off unless asked for."""

from __future__ import annotations

import numpy as np
import pytest

from cxrscreen.gate.model import Gate, bundled_gate_path
from cxrscreen.io.xray import XRay
from cxrscreen.lungs import segmenter
from cxrscreen.lungs.segmenter import LungResult


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
