"""Repeated grouped CV: no split_group in two folds, nested penalty choice, figures that can fail."""

from __future__ import annotations

import numpy as np

from cxrscreen.severity.cv import crossval
from cxrscreen.severity.features import FeatureSpec
from cxrscreen.severity.model import group_folds


def _groups(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"S{g}" for g in rng.integers(0, n // 2, n)]


def test_group_folds_keep_every_group_in_one_fold() -> None:
    groups = _groups(90)
    for seed in range(5):
        folds = group_folds(groups, 5, seed)
        assert set(folds) == set(range(5))
        for g in set(groups):
            assert len({int(f) for f, gg in zip(folds, groups, strict=True) if gg == g}) == 1
    assert (group_folds(groups, 5, 0) != group_folds(groups, 5, 1)).any()  # repeats reshuffle


def test_crossval_folds_are_grouped_and_a_linear_signal_is_found() -> None:
    rng = np.random.default_rng(0)
    n, d = 90, 40
    groups = _groups(n, 1)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, 2))
    y = x @ w
    y = 8 * (y - y.min(0)) / (y.max(0) - y.min(0)) * np.array([1.0, 0.75])  # 0-8 and 0-6
    res = crossval(x, y, groups, FeatureSpec(), [d], k=5, repeats=3, n_boot=50)
    for r in range(3):
        for g in set(groups):
            assert len({int(f) for f, gg in zip(res["folds"][r], groups, strict=True) if gg == g}) == 1
    assert res["geographic_extent"]["pearson_r"]["value"] > 0.9
    assert res["opacity"]["mae"]["value"] < 0.5
    lo, hi = res["geographic_extent"]["mae"]["ci95"]
    assert lo <= res["geographic_extent"]["mae"]["value"] <= hi


def test_duplicates_inside_a_group_do_not_leak() -> None:
    """Noise targets on images that come in identical pairs (one group each): a grouped CV must find no
    skill, whereas an image-level split would let each copy predict its twin."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(45, 200))
    x = np.repeat(base, 2, axis=0)
    y = np.repeat(np.stack([rng.uniform(0, 8, 45), rng.uniform(0, 6, 45)], 1), 2, axis=0)
    groups = [f"S{i // 2}" for i in range(90)]
    res = crossval(x, y, groups, FeatureSpec(), [200], k=5, repeats=2, n_boot=20)
    assert res["geographic_extent"]["pearson_r"]["value"] < 0.4
    leaky = crossval(x, y, [str(i) for i in range(90)], FeatureSpec(), [200], k=5, repeats=2, n_boot=20)
    assert leaky["geographic_extent"]["pearson_r"]["value"] > 0.6  # the test above can fail
