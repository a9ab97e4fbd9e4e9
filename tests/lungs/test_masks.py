"""Lung label maps: cleaning, boxes, Brixia thirds, heat inside the lungs, Dice, PNG round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrscreen.errors import CXRError
from cxrscreen.lungs.masks import (
    LEFT,
    RIGHT,
    clean_label_map,
    dice_iou,
    draw_masks,
    heat_share_inside,
    lung_box,
    lung_fractions,
    read_mask,
    write_mask,
    zone_masks,
)


def two_lungs(h: int = 200, w: int = 240) -> np.ndarray:
    """Ellipses: the right lung (1) on the image's left, the left lung (2) on the image's right."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), np.uint8)
    out[((xx - 0.3 * w) / (0.15 * w)) ** 2 + ((yy - 0.5 * h) / (0.3 * h)) ** 2 < 1] = RIGHT
    out[((xx - 0.7 * w) / (0.15 * w)) ** 2 + ((yy - 0.45 * h) / (0.3 * h)) ** 2 < 1] = LEFT
    return out


def test_clean_keeps_largest_component_and_fills_holes() -> None:
    m = two_lungs()
    m[5:9, 5:9] = RIGHT  # a speck far from the lung
    m[100, 72] = 0  # a hole inside the right lung
    c = clean_label_map(m)
    assert c[6, 6] == 0 and c[100, 72] == RIGHT
    assert (c == LEFT).sum() == (two_lungs() == LEFT).sum()


def test_boxes_and_fractions_keep_sides() -> None:
    m = two_lungs()
    right, left = lung_box(m, "right"), lung_box(m, "left")
    assert right is not None and left is not None
    assert right[2] <= left[0]  # the patient's right lung lies on the image's left
    fr = lung_fractions(m)
    assert 0.05 < fr["right"] < 0.2 and 0.05 < fr["left"] < 0.2
    assert lung_box(np.zeros((10, 10), np.uint8), "left") is None


def test_zones_are_thirds_of_each_lungs_own_height() -> None:
    m = two_lungs()
    zones = zone_masks(m)
    assert [z["brixia"] for z in zones] == list("ABCDEF")
    assert [z["lung"] for z in zones] == ["right"] * 3 + ["left"] * 3
    for lung, k in (("right", RIGHT), ("left", LEFT)):
        mine = [z for z in zones if z["lung"] == lung]
        union = np.zeros_like(m, bool)
        for z in mine:
            assert not (union & z["mask"]).any()
            union |= z["mask"]
        assert (union == (m == k)).all()
        ys = np.nonzero((m == k).any(axis=1))[0]
        height = ys.max() + 1 - ys.min()
        tops = [z["box"][1] for z in mine]
        assert tops[0] == ys.min()
        assert tops[1] - tops[0] == pytest.approx(height / 3, abs=1)
    # the left lung sits higher here, so its cuts differ from the right lung's
    assert zones[3]["box"][1] < zones[0]["box"][1]


def test_zones_of_a_missing_lung_are_empty() -> None:
    m = two_lungs()
    m[m == LEFT] = 0
    zones = zone_masks(m)
    assert all(z["box"] is None and not z["mask"].any() for z in zones[3:])


def test_heat_share_inside() -> None:
    m = two_lungs()
    heat = np.zeros(m.shape, np.float32)
    heat[m == RIGHT] = 1.0
    heat[0:10, 0:10] = 1.0
    inside = heat_share_inside(heat, m > 0)
    assert inside == pytest.approx((m == RIGHT).sum() / ((m == RIGHT).sum() + 100))
    assert heat_share_inside(np.zeros(m.shape), m > 0) is None


def test_dice_iou() -> None:
    a = np.zeros((10, 10), bool)
    b = a.copy()
    a[:5], b[:, :5] = True, True
    d, i = dice_iou(a, b)
    assert d == pytest.approx(0.5) and i == pytest.approx(25 / 75)
    assert dice_iou(np.zeros(4, bool), np.zeros(4, bool)) == (1.0, 1.0)


def test_mask_png_round_trip_and_errors(tmp_path: Path) -> None:
    m = two_lungs()
    p = write_mask(m, tmp_path / "x" / "m.png")
    assert (read_mask(p, m.shape) == m).all()
    with pytest.raises(CXRError, match="differs"):
        read_mask(p, (10, 10))
    import cv2

    cv2.imwrite(str(tmp_path / "bad.png"), np.full((4, 4), 255, np.uint8))
    with pytest.raises(CXRError, match="labels 0, 1, 2"):
        read_mask(tmp_path / "bad.png")
    with pytest.raises(CXRError, match="cannot read"):
        read_mask(tmp_path / "none.png")


def test_draw_masks_tints_each_lung() -> None:
    m = two_lungs()
    img = draw_masks(np.full(m.shape, 0.5, np.float32), m)
    assert img.shape == (*m.shape, 3)
    cy, cx = 100, 72
    b, g, r = img[cy, cx].astype(int)
    assert r > b  # right lung: orange
    b, g, r = img[90, 168].astype(int)
    assert b > r  # left lung: blue


def test_lung_boxes_right_first_and_empty() -> None:
    from cxrscreen.lungs.masks import lung_boxes

    m = np.zeros((20, 30), np.uint8)
    m[2:10, 18:25] = LEFT
    m[5:15, 3:9] = RIGHT
    boxes, lungs = lung_boxes(m)
    assert lungs.tolist() == [RIGHT, LEFT] and boxes.dtype == np.float32
    assert boxes.tolist() == [[3, 5, 9, 15], [18, 2, 25, 10]]
    b0, l0 = lung_boxes(np.zeros((4, 4), np.uint8))
    assert b0.shape == (0, 4) and l0.shape == (0,)
