"""scripts/operating_point_check.py: the val threshold reaches the target sensitivity and is the highest that
does; the rates count COVID found and others not called COVID under that threshold."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _load():
    path = REPO / "scripts" / "operating_point_check.py"
    spec = importlib.util.spec_from_file_location("operating_point_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_val_threshold_is_the_highest_reaching_the_target():
    op = _load()
    labels = np.array([0] * 10 + [1] * 5)
    p = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1] + [0.05] * 5)
    t = op.val_threshold(labels, p, 0.9)
    assert t == 0.2 and (p[labels == 0] >= t).mean() >= 0.9
    assert (p[labels == 0] >= np.nextafter(t, 1)).mean() < 0.9  # any higher threshold misses the target


def test_rates_under_the_threshold_rule():
    op = _load()
    labels = np.array([0, 0, 1, 2])
    probs = np.array([[0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.35, 0.6, 0.05], [0.1, 0.1, 0.8]])
    r = op.rates(labels, probs, ["a", "b", "c", "d"], threshold=0.3, n_boot=20)
    assert r["covid_found"]["value"] == 0.5  # 0.4 >= 0.3 found, 0.2 not
    assert r["others_not_covid"]["value"] == 0.5  # 0.35 >= 0.3 called COVID
