"""Zone geometry on a synthetic image with known lung boxes, the per-lung allocation and the overlay."""

from __future__ import annotations

import numpy as np
import pytest

from cxrscreen.severity.zones import allocate, lung_zones, region_mean, zone_lines

BOXES = {"right": [20.0, 30.0, 90.0, 180.0], "left": [110.0, 36.0, 180.0, 186.0]}


def test_six_zones_are_thirds_of_each_lung_box() -> None:
    zones = lung_zones(BOXES)
    assert [z["brixia"] for z in zones] == list("ABCDEF")
    assert [(z["lung"], z["level"]) for z in zones[:3]] == [("right", "upper"), ("right", "middle"),
                                                            ("right", "lower")]
    a, b, c = (z["box"] for z in zones[:3])
    assert a == [20.0, 30.0, 90.0, 80.0] and b == [20.0, 80.0, 90.0, 130.0] and c == [20.0, 130.0, 90.0, 180.0]
    d, _, f = (z["box"] for z in zones[3:])
    assert d[1] == 36.0 and f[3] == 186.0 and d[0] == 110.0 and f[2] == 180.0


def test_allocate_keeps_the_total_and_the_cap() -> None:
    assert allocate(4.0, [1, 1], 4.0) == pytest.approx([2.0, 2.0])
    assert allocate(6.0, [3, 1], 4.0) == pytest.approx([4.0, 2.0])  # overflow goes to the other lung
    assert allocate(3.0, [0, 0, 0], 4.0) == pytest.approx([1.0, 1.0, 1.0])  # no evidence: equal
    assert allocate(2.0, [-1, 1], 4.0) == pytest.approx([0.0, 2.0])
    assert sum(allocate(9.0, [1, 2], 4.0)) == pytest.approx(8.0)  # never above the range


def test_region_mean_reads_the_box() -> None:
    m = np.zeros((10, 10))
    m[:, 5:] = 2.0
    assert region_mean(m, (5, 0, 10, 10)) == 2.0 and region_mean(m, (0, 0, 5, 10)) == 0.0
    assert region_mean(m, (20, 20, 30, 30)) is None


def test_zone_band_lists_every_zone_and_stays_off_the_xray() -> None:
    from cxrscreen.explain.overlay import with_band

    sev = {"geographic_extent": 3.0, "opacity": 2.0, "per_lung": {"right": 1.0, "left": 2.0},
           "zones": [{**z, "extent_estimate": 1.0, "brixia_score": 1} for z in lung_zones(BOXES)]}
    lines = zone_lines(sev)
    assert all(f"{k} 1.0 (Brixia 1)" in lines[1] for k in "ABCDEF")
    img = np.full((220, 200, 3), 7, np.uint8)
    out = with_band(img, lines, where="bottom")
    assert out.shape[0] > 220 and (out[:220] == 7).all()  # the X-ray untouched
    assert (out[220:].reshape(-1, 3).max(0) > 200).any()  # text in the band
    top = with_band(img, ["a caption"], where="top")
    assert (top[-220:] == 7).all()
