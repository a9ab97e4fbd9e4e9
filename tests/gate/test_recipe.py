"""The gate's data recipe (cxrscreen.gate.recipe) and fit_gate_from_recipe on generated images only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cxrscreen.gate import recipe
from cxrscreen.gate.fit import fit_gate_from_recipe
from cxrscreen.gate.model import Gate
from tests.conftest import synthetic_cxr


def test_seen_and_unseen_kinds_are_disjoint() -> None:
    assert not set(recipe.SEEN_KINDS) & set(recipe.UNSEEN_KINDS)
    assert {"document", "ct_slice", "skimage:camera"} <= set(recipe.SEEN_KINDS)
    assert {"screenshot", "lateral_like", "skimage:moon"} <= set(recipe.UNSEEN_KINDS)


def test_split_half_is_the_md5_parity_of_the_group() -> None:
    for g in ("p1", "p2", "cohen-17", "rsna-0042"):
        even = int(hashlib.md5(g.encode()).hexdigest(), 16) % 2 == 0
        assert recipe.split_half(g) == ("fit" if even else "eval")


def test_make_others_writes_and_reads_back_reproducibly(tmp_path: Path) -> None:
    kinds = {k: recipe.SEEN_KINDS[k] for k in ("gradient", "document", "skimage:camera")}
    a = list(recipe.make_others(kinds, 2, tmp_path / "a", seed=0, role="fit"))
    b = list(recipe.make_others(kinds, 2, tmp_path / "b", seed=0, role="fit"))
    ev = list(recipe.make_others(kinds, 2, tmp_path / "c", seed=0, role="eval"))
    assert [k for k, _ in a] == ["gradient", "gradient", "document", "document", "skimage:camera", "skimage:camera"]
    for (_, xa), (_, xb), (_, xe) in zip(a, b, ev, strict=True):
        assert Path(xa.path).parent == tmp_path / "a" and Path(xa.path).suffix in (".png", ".jpg")
        assert xa.pixels.dtype == np.float32 and 0.0 <= xa.pixels.min() <= xa.pixels.max() <= 1.0
        assert np.array_equal(xa.pixels, xb.pixels)  # same kind, seed and role: the same image
        assert xa.pixels.shape != xe.pixels.shape or not np.array_equal(xa.pixels, xe.pixels)


def test_photometric_variant_keeps_the_image_in_range() -> None:
    from cxrscreen.io.xray import XRay

    x = XRay(pixels=synthetic_cxr(64, 64), path="x.png", meta={})
    rng = np.random.default_rng(0)
    for _ in range(10):
        v = recipe.photometric_variant(x, rng)
        assert v.pixels.shape == x.pixels.shape and 0.0 <= v.pixels.min() <= v.pixels.max() <= 1.0
        assert not np.array_equal(v.pixels, x.pixels)


@pytest.fixture()
def tiny_manifest(tmp_path: Path) -> Path:
    """40 generated chest-X-ray-like PNGs, one group each (about half land in the fit half)."""
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(40):
        name = f"images/{i}.png"
        assert cv2.imwrite(str(tmp_path / name), np.rint(synthetic_cxr(200, 220, seed=i) * 255).astype(np.uint8))
        rows.append({"image": name, "label": "normal", "source": "ab"[i % 2], "patient_id": f"p{i}",
                     "split_group": f"g{i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path


def test_real_manifest_halves(tiny_manifest: Path) -> None:
    full = recipe.real_manifest(tiny_manifest)
    fit, ev = recipe.real_manifest(tiny_manifest, "fit"), recipe.real_manifest(tiny_manifest, "eval")
    assert len(fit) + len(ev) == len(full) == 40 and len(fit) > 5 and len(ev) > 5
    assert set(fit["split_group"]).isdisjoint(ev["split_group"])
    assert len(recipe.read_real(tiny_manifest, fit.head(3))) == 3


def test_fit_gate_from_recipe(tiny_manifest: Path, tmp_path: Path) -> None:
    gate = fit_gate_from_recipe(tiny_manifest, per_kind=2, seed=0)
    n_fit = len(recipe.real_manifest(tiny_manifest, "fit"))
    info = gate.info
    assert info["real_images"] == n_fit and info["n_real"] == 2 * n_fit  # one photometric copy each
    assert info["n_other"] == 2 * len(recipe.SEEN_KINDS) and info["other_kinds"] == sorted(recipe.SEEN_KINDS)
    assert info["unseen_kinds_held_out"] == sorted(recipe.UNSEEN_KINDS)
    assert sum(info["real_per_source"].values()) == n_fit
    gate.to_json(tmp_path / "gate.json")
    again = Gate.from_json(tmp_path / "gate.json")
    assert again.p_threshold == gate.p_threshold and again.novelty_threshold == gate.novelty_threshold
    plain = fit_gate_from_recipe(tiny_manifest, per_kind=2, seed=0, photometric=False)
    assert plain.info["n_real"] == n_fit and plain.info["real_photometric_copies"] is False
