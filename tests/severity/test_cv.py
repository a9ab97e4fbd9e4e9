"""Repeated grouped CV: no split_group in two folds, nested penalty and feature-set choice, figures that can fail."""

from __future__ import annotations

import numpy as np
import pytest

from cxrscreen.errors import CXRError
from cxrscreen.severity.cv import CANDIDATES, candidate_name, crossval, nested
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


def _signal(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, 2) in range and features (N, 30) that carry them with noise."""
    base = rng.uniform(0, 1, n)
    y = np.stack([8 * base, 6 * np.clip(base + rng.normal(0, 0.1, n), 0, 1)], 1)
    x = np.concatenate([y + rng.normal(0, 1.5, (n, 2)), rng.normal(size=(n, 28))], 1)
    return x, y


def test_nested_selection_never_sees_the_outer_test_fold() -> None:
    """A candidate whose features give the scores away on outer fold 0's images only (noise elsewhere): an
    inner CV that saw those images would rate it near perfect; the nested choice for that fold, made on the
    training images alone, must be the honest candidate, and the fold's nested predictions its predictions."""
    rng = np.random.default_rng(5)
    n = 90
    groups = _groups(n, 2)
    honest, y = _signal(n, rng)
    test0 = group_folds(groups, 5, 0) == 0
    leak = rng.normal(size=(n, 30))
    leak[test0, :2] = y[test0]
    res = {name: crossval(x, y, groups, FeatureSpec(), [30], k=5, repeats=1, n_boot=20)
           for name, x in (("leak", leak), ("honest", honest))}
    assert np.array_equal(res["leak"]["folds"][0] == 0, test0)
    out = nested(res, y, groups, n_boot=20)
    assert out["chosen"][0][0] == "honest"
    np.testing.assert_allclose(out["oof"][0, test0], res["honest"]["oof"][0, test0])
    for r in range(len(out["chosen"])):  # grouped: no split_group in two outer folds
        for g in set(groups):
            assert len({int(f) for f, gg in zip(res["honest"]["folds"][r], groups, strict=True) if gg == g}) == 1
    # the control: when the leak is on every image, the inner CV rates it best and nested picks it
    leak_all = rng.normal(size=(n, 30))
    leak_all[:, :2] = y
    res["leak"] = crossval(leak_all, y, groups, FeatureSpec(), [30], k=5, repeats=1, n_boot=20)
    assert set(nested(res, y, groups, n_boot=20)["chosen"][0]) == {"leak"}


def test_nested_picks_per_fold_and_needs_the_same_folds() -> None:
    rng = np.random.default_rng(7)
    groups = _groups(90, 3)
    good, y = _signal(90, rng)
    noise = rng.normal(size=(90, 30))
    res = {name: crossval(x, y, groups, FeatureSpec(), [30], k=5, repeats=2, n_boot=20)
           for name, x in (("noise", noise), ("good", good))}
    out = nested(res, y, groups, n_boot=20)
    assert out["chosen_counts"] == {"good": 10}
    assert out["geographic_extent"]["mae"]["value"] == pytest.approx(res["good"]["geographic_extent"]["mae"]["value"])
    res["noise"] = crossval(noise, y, groups, FeatureSpec(), [30], k=5, repeats=2, seed=1, n_boot=20)
    with pytest.raises(CXRError, match="same folds"):
        nested(res, y, groups)


def test_candidate_names_are_unique_and_describe_the_spec() -> None:
    assert len({candidate_name(s) for s in CANDIDATES.values()}) == len(CANDIDATES)
    assert "imagenet_pad224_b2-b6" in CANDIDATES  # the earlier names still mean the same feature sets
    spec = CANDIDATES["imagenet_pad224_b2-b6_noclahe_lungs_flip"]
    assert spec.pooling == "lungs" and spec.flip and not spec.preprocess.clahe
    assert CANDIDATES["imagenet-lite2_pad260_b2-b6_lungs"].arch == "tf_efficientnet_lite2"
