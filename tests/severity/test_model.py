"""The ridge regressor: spatial map averages to the prediction; save / load round trip and checksum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrscreen.errors import CXRError
from cxrscreen.severity.features import FeatureSpec, pool
from cxrscreen.severity.model import SeverityRegressor


def _fit(seed: int = 0) -> tuple[SeverityRegressor, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    maps = [rng.normal(size=(30, 5, 4, 4)), rng.normal(size=(30, 7, 2, 2))]
    x = pool(maps)
    y = np.clip(np.stack([x[:, 0] * 2 + 4, x[:, 6] + 3], 1), 0, [8, 6])
    reg = SeverityRegressor.fit(x, y, [str(i // 3) for i in range(30)], FeatureSpec(), [5, 7])
    return reg, maps


def test_spatial_map_averages_to_the_prediction() -> None:
    reg, maps = _fit()
    for i in range(3):
        smap = reg.spatial_map([m[i] for m in maps], 16)
        raw = reg.predict_raw(pool([m[i:i + 1] for m in maps]))[0]
        np.testing.assert_allclose(smap.mean(axis=(1, 2)), raw, atol=1e-4)


def test_save_load_round_trip_and_checksum(tmp_path: Path) -> None:
    reg, maps = _fit()
    reg.save(tmp_path, {"note": "test"})
    back = SeverityRegressor.load(tmp_path)
    x = pool(maps)
    np.testing.assert_allclose(back.predict(x), reg.predict(x), atol=1e-4)
    assert back.spec == reg.spec and back.alphas == reg.alphas and back.meta["note"] == "test"
    assert (tmp_path / "severity.safetensors").stat().st_size < 10_000
    raw = bytearray((tmp_path / "severity.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "severity.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CXRError, match="checksum"):
        SeverityRegressor.load(tmp_path)


def test_predictions_are_clipped_to_the_score_ranges() -> None:
    reg, maps = _fit()
    far = pool(maps)[:1] * 1e6
    p = reg.predict(far)[0]
    assert 0 <= p[0] <= 8 and 0 <= p[1] <= 6


def test_card_section_is_replaced_not_appended(tmp_path: Path) -> None:
    import json

    from cxrscreen.severity.card import START, update_card

    reg, _ = _fit()
    reg.save(tmp_path, {"candidate": "x"})
    (tmp_path / "MODEL_CARD.md").write_text("# card\n")
    (tmp_path / "model_card.json").write_text("{}")
    assert update_card(tmp_path) and update_card(tmp_path)
    text = (tmp_path / "MODEL_CARD.md").read_text()
    assert text.startswith("# card") and text.count(START) == 1 and "checked against BrixIA radiologists" in text
    assert json.loads((tmp_path / "model_card.json").read_text())["severity"]["candidate"] == "x"


def test_lung_pooling_spatial_map_sums_to_the_prediction() -> None:
    """Per-region averages: the prediction is the intercept plus, per region, M's mean over the region minus
    the intercept (exact when the output size is the maps' resolution)."""
    from cxrscreen.severity.features import region_cells

    rng = np.random.default_rng(1)
    maps = [rng.normal(size=(30, 5, 8, 8))]
    boxes = [(0.0, 8.0, 30.0, 56.0), (34.0, 8.0, 62.0, 60.0)]  # model pixels of a 64 px input
    x = pool(maps, [boxes] * 30, 64)
    assert x.shape == (30, 10)
    ys, xs = region_cells(boxes[1], (8, 8), 64)
    np.testing.assert_allclose(x[:, 5:], maps[0][:, :, ys, xs].mean(axis=(2, 3)))
    y = np.clip(np.stack([x[:, 0] * 2 + 4, x[:, 6] + 3], 1), 0, [8, 6])
    spec = FeatureSpec(pooling="lungs")
    reg = SeverityRegressor.fit(x, y, [str(i // 3) for i in range(30)], spec, [5])
    smap = reg.spatial_map([maps[0][0]], 8, [tuple(v / 8 for v in b) for b in boxes])  # at map resolution
    cells = [region_cells(tuple(v / 8 for v in b), (8, 8), 8) for b in boxes]
    total = reg.intercept + sum(smap[:, ys, xs].mean(axis=(1, 2)) - reg.intercept for ys, xs in cells)
    np.testing.assert_allclose(total, reg.predict_raw(x[:1])[0], atol=1e-4)
    with pytest.raises(CXRError, match="region"):
        SeverityRegressor.fit(x[:, :5], y, [str(i // 3) for i in range(30)], spec, [5])


def test_spec_round_trip_and_old_specs_load() -> None:
    spec = FeatureSpec("imagenet", pooling="lungs", flip=True)
    assert FeatureSpec.from_dict(spec.to_dict()) == spec and spec.regions == ("right", "left")
    old = {k: v for k, v in FeatureSpec().to_dict().items() if k not in ("pooling", "flip")}
    assert FeatureSpec.from_dict(old) == FeatureSpec()
    with pytest.raises(CXRError, match="pooling"):
        FeatureSpec(pooling="zones")


def test_flip_averaged_maps_mirror_with_the_image() -> None:
    """With flip averaging, the maps of a mirrored image are the mirrored maps; without it they are not."""
    from cxrscreen.models.registry import create_model
    from cxrscreen.severity.features import FeatureExtractor
    from cxrscreen.transforms.preprocess import PreprocessConfig

    model = create_model("tf_efficientnet_lite0", num_classes=3)
    img = (np.random.default_rng(0).uniform(0, 255, (64, 64))).astype(np.uint8)
    for flip in (True, False):
        spec = FeatureSpec(preprocess=PreprocessConfig(64, resize_mode="pad"), blocks=("blocks.4",), flip=flip)
        ext = FeatureExtractor(model, spec)
        a, b = ext.maps([img, np.ascontiguousarray(img[:, ::-1])])[0]
        assert np.allclose(a, b[..., ::-1], atol=1e-5) == flip


def test_lung_mask_pooling_weights_the_cells_each_lung_covers(sev_run) -> None:  # noqa: ANN001
    from dataclasses import replace

    from cxrscreen.severity.features import FeatureExtractor, pool_weighted
    from tests.severity.conftest import SPEC

    maps = [np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)]  # one image, 2 channels, 4 x 4 cells
    right = np.zeros((64, 64), np.float32)
    right[16:48, 0:32] = 1  # cells rows 1-2, columns 0-1 of the 4 x 4 map
    half = np.zeros((64, 64), np.float32)
    half[0:16, 56:64] = 1  # half of cell (0, 3)
    got = pool_weighted(maps, [[right, half]])
    expect_right = maps[0][0][:, 1:3, 0:2].mean(axis=(1, 2))
    np.testing.assert_allclose(got[0], np.concatenate([expect_right, maps[0][0][:, 0, 3]]))
    ext = FeatureExtractor(sev_run.model, replace(SPEC, pooling="lung_masks", flip=False))
    _, geom = ext.prepare(np.zeros((80, 96), np.float32))
    only_right = np.zeros((64, 64), np.uint8)
    only_right[10:50, 5:30] = 1
    w_right, w_left = ext.lung_weights(only_right, geom)
    assert w_right.sum() == only_right.sum() and w_left.sum() > 0  # the left lung's atlas box stands in
    assert np.nonzero(w_left)[1].mean() > 32  # on the image's right: the patient's left
    with pytest.raises(CXRError, match="one lung label map per image"):
        ext.features(maps, [geom])


def test_lung_mask_spatial_map_sums_to_the_prediction() -> None:
    """Weighted regions: M's mean over each region's cells, summed as for boxes, gives the prediction."""
    from cxrscreen.severity.features import pool_weighted

    rng = np.random.default_rng(2)
    maps = [rng.normal(size=(30, 5, 8, 8))]
    right, left = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)
    right[1:7, 0:3] = 1
    left[2:7, 5:8] = rng.uniform(0.2, 1.0, size=(5, 3))  # partial cover, as at a lung's edge
    x = pool_weighted(maps, [[right, left]] * 30)
    y = np.clip(np.stack([x[:, 0] * 2 + 4, x[:, 6] + 3], 1), 0, [8, 6])
    reg = SeverityRegressor.fit(x, y, [str(i // 3) for i in range(30)], FeatureSpec(pooling="lung_masks"), [5])
    smap = reg.spatial_map([maps[0][0]], 8, weights=[right, left])
    total = reg.intercept + sum(smap[:, w > 0].mean(axis=1) - reg.intercept for w in (right, left))
    np.testing.assert_allclose(total, reg.predict_raw(x[:1])[0], atol=1e-4)


def test_lung_mask_candidates_are_the_atlas_ones_with_segmented_lungs() -> None:
    from cxrscreen.severity.cv import ATLAS_BOX_CANDIDATES, CANDIDATES, DEFAULT_CANDIDATES, LUNG_MASK_CANDIDATES

    assert LUNG_MASK_CANDIDATES and not set(LUNG_MASK_CANDIDATES) & set(ATLAS_BOX_CANDIDATES)
    assert len(DEFAULT_CANDIDATES) == len(ATLAS_BOX_CANDIDATES) and set(LUNG_MASK_CANDIDATES) <= set(DEFAULT_CANDIDATES)
    assert not any(CANDIDATES[n].pooling == "lungs" for n in DEFAULT_CANDIDATES)
    for name, spec in LUNG_MASK_CANDIDATES.items():
        assert spec.pooling == "lung_masks" and CANDIDATES[name.replace("lung_masks", "lungs")].pooling == "lungs"
