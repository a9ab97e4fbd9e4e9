"""The "lungs" resize mode: crop to both lungs' box plus a margin, pad to a square, map back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from cxrscreen.lungs import segmenter
from cxrscreen.lungs.segmenter import LungResult
from cxrscreen.transforms.preprocess import PreprocessConfig, Preprocessor, geometry_for


class FakeSegmenter:
    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def segment(self, pixels: np.ndarray) -> LungResult:
        return LungResult(self.mask)


def _mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[40:160, 30:90] = 1
    m[50:150, 110:170] = 2
    return m


def test_lungs_mode_crops_to_the_lungs_plus_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    h, w = 200, 240
    monkeypatch.setattr(segmenter, "_BUNDLED", FakeSegmenter(_mask(h, w)))
    cfg = PreprocessConfig(image_size=64, clahe=False, resize_mode="lungs", lung_margin=0.1)
    img, geom = Preprocessor(cfg)(np.random.default_rng(0).random((h, w), dtype=np.float32))
    assert img.shape == (64, 64)
    # lungs span x 30-170 (140 wide), y 40-160 (120 high): margins 14 and 12
    assert geom.box == (16, 28, 184, 172)
    assert geom.square == 168 and geom.pad[1] + geom.pad[3] == 168 - 144
    heat = np.ones((64, 64), np.float32)
    back = geom.to_original(heat)
    assert back[100, 100] == 1 and back[10, 10] == 0  # outside the crop: nothing


def test_lungs_mode_without_lungs_keeps_the_whole_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segmenter, "_BUNDLED", FakeSegmenter(np.zeros((50, 80), np.uint8)))
    _, geom = Preprocessor(PreprocessConfig(image_size=32, resize_mode="lungs"))(np.zeros((50, 80), np.float32))
    assert geom.box == (0, 0, 80, 50)


def test_lungs_mode_config_and_cache_keys() -> None:
    assert PreprocessConfig(lung_margin=0.3).cache_key() == PreprocessConfig().cache_key()  # crop keys unchanged
    a, b = PreprocessConfig(resize_mode="lungs"), PreprocessConfig(resize_mode="lungs", lung_margin=0.2)
    assert a.cache_key() != b.cache_key()
    assert PreprocessConfig.from_dict(b.to_dict()) == b
    with pytest.raises(ValueError, match="lung_margin"):
        PreprocessConfig(lung_margin=2.0)
    with pytest.raises(ValueError, match="depends on the image"):
        geometry_for(a, (10, 10))


class GridSegmenter:
    """A segmenter whose grid (the network's label map) is `grid` and whose full-size mask must not be read."""

    def __init__(self, grid: np.ndarray) -> None:
        self.grid = grid

    def segment(self, pixels: np.ndarray) -> LungResult:
        res = LungResult(np.zeros((1, 1), np.uint8))
        res.grid = self.grid
        res._mask = None  # reading .mask would now fail: the grid source must not need it
        return res


def test_grid_box_scales_the_segmenters_grid_to_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    h, w = 200, 240
    grid = np.zeros((100, 120), np.uint8)  # half the image's size in each direction
    grid[20:80, 15:45] = 1
    grid[25:75, 55:85] = 2
    monkeypatch.setattr(segmenter, "_BUNDLED", GridSegmenter(grid))
    cfg = PreprocessConfig(image_size=64, clahe=False, resize_mode="lungs", lung_margin=0.1, lung_box="grid")
    _, geom = Preprocessor(cfg)(np.random.default_rng(0).random((h, w), dtype=np.float32))
    assert geom.box == (16, 28, 184, 172)  # the same lungs as the full-size mask above, read at half resolution


def test_lung_box_default_keeps_configs_and_cache_keys_as_they_were() -> None:
    mask_cfg = PreprocessConfig(resize_mode="lungs")
    assert "lung_box" not in mask_cfg.to_dict()
    assert PreprocessConfig.from_dict(mask_cfg.to_dict()) == mask_cfg
    grid_cfg = PreprocessConfig(resize_mode="lungs", lung_box="grid")
    assert PreprocessConfig.from_dict(grid_cfg.to_dict()) == grid_cfg
    assert grid_cfg.cache_key() != mask_cfg.cache_key()
    with pytest.raises(ValueError, match="lung_box"):
        PreprocessConfig(resize_mode="lungs", lung_box="full")
