"""Per-lung allocation and the six-zone map in the Brixia layout, and its overlay.

Each lung (its segmented mask, or where none is found a box x0, y0, x1, y1 in original pixels; the patient's
right lung lies on the viewer's left) is cut into upper, middle and lower thirds of its height: zones A, B, C
(right lung) and D, E, F (left lung), the Brixia layout. The figures put in them spread the whole-image
regressor's geographic extent (see ``scorer``) by its spatial map; `brixia` maps a zone's 0-4 extent onto the
Brixia 0-3 scale (x 3/4). scripts/brixia_check.py measures those zone scores against the BrixIA radiologists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LUNGS: tuple[str, ...] = ("right", "left")
LEVELS: tuple[str, ...] = ("upper", "middle", "lower")
BRIXIA: dict[tuple[str, str], str] = {(lg, lv): "ABCDEF"[3 * i + j] for i, lg in enumerate(LUNGS)
                                      for j, lv in enumerate(LEVELS)}
LUNG_MAX = 4.0  # geographic extent per lung: 0-4
ESTIMATE_NOTE = ("per-lung figures are estimates: the whole-image geographic extent spread over the segmented "
                 "lungs by the regressor's spatial map (no per-lung labels check them). Zones are the thirds of "
                 "each segmented lung's height (Brixia layout); their Brixia 0-3 figures are checked against "
                 "BrixIA radiologists in docs/results/severity/brixia_check.json (README, severity).")
BRIXIA_PER_EXTENT = 3.0 / 4.0  # a zone's 0-4 extent -> the Brixia 0-3 scale


def brixia_of_extent(extent: float) -> int:
    """A zone's 0-4 extent on the Brixia 0-3 scale (rounded; a fixed mapping, fitted on nothing)."""
    return int(np.clip(np.rint(extent * BRIXIA_PER_EXTENT), 0, 3))


def zone_lines(severity: dict[str, Any]) -> list[str]:
    """The text band under a heatmap: the scores, per lung, and the six zones with their Brixia 0-3 figure."""
    pl = severity["per_lung"]
    z = {d["brixia"]: d for d in severity["zones"]}
    zones = "  ".join(f"{k} {z[k]['extent_estimate']:.1f} (Brixia {z[k].get('brixia_score', '-')})"
                      for k in "ABCDEF" if k in z)
    return [f"severity: extent {severity['geographic_extent']:.1f}/8, opacity {severity['opacity']:.1f}/6; "
            f"right lung {pl['right']:.1f}/4, left lung {pl['left']:.1f}/4",
            "zones (extent 0-4): " + zones]



def with_zones(img: np.ndarray, res: dict[str, Any]) -> np.ndarray:
    """A task drawer's picture (BGR uint8) with `zone_lines` in a band added below it when the result `res` has
    severity (nothing drawn over the lungs); `img` itself when it has none. Pure: nothing is read or written."""
    sev = res.get("severity")
    if not sev:
        return img
    from cxrscreen.explain.overlay import with_band

    return with_band(img, zone_lines(sev), where="bottom")


def lung_zones(boxes: dict[str, Sequence[float]]) -> list[dict[str, Any]]:
    """Six zones (right then left; upper, middle, lower) from {"right": box, "left": box}: each
    {lung, level, brixia, box: [x0, y0, x1, y1]} with the lung box's full width and a third of its height."""
    zones = []
    for lg in LUNGS:
        x0, y0, x1, y1 = (float(v) for v in boxes[lg])
        h = (y1 - y0) / 3
        for j, lv in enumerate(LEVELS):
            zones.append({"lung": lg, "level": lv, "brixia": BRIXIA[(lg, lv)],
                          "box": [x0, y0 + j * h, x1, y0 + (j + 1) * h]})
    return zones


def allocate(total: float, weights: Sequence[float], cap: float) -> list[float]:
    """Split `total` over parts in proportion to `weights` (negative ones count 0; all 0: equal shares),
    none above `cap`: an overflow goes to the parts below the cap, in proportion again."""
    w = np.clip(np.asarray(weights, np.float64), 0, None)
    n = len(w)
    total = float(np.clip(total, 0, cap * n))
    out = np.zeros(n)
    free = np.ones(n, bool)
    left = total
    while left > 1e-9 and free.any():
        ww = w * free
        share = ww / ww.sum() if ww.sum() > 0 else free / free.sum()
        add = share * left
        over = out + add > cap
        if not over.any():
            out += add
            break
        out[over & free] = cap
        free &= ~over
        left = total - out.sum()
    return [float(v) for v in out]


def region_mean(values: np.ndarray, box: Sequence[float]) -> float | None:
    """Mean of a 2-D map inside box (x0, y0, x1, y1, the map's pixels; clipped to it), None if empty."""
    h, w = values.shape
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w)), int(np.clip(np.floor(box[1]), 0, h))
    x1, y1 = int(np.clip(np.ceil(box[2]), 0, w)), int(np.clip(np.ceil(box[3]), 0, h))
    if x1 <= x0 or y1 <= y0:
        return None
    return float(values[y0:y1, x0:x1].mean())
