"""Per-lung allocation and the six-zone map in the Brixia layout, and its overlay.

Each lung box (x0, y0, x1, y1, original pixels; the image's right lung lies on the viewer's left) is cut
into upper, middle and lower thirds of its height: zones A, B, C (right lung) and D, E, F (left lung), the
Brixia layout. The figures put in them are estimates derived from the whole-image regressor (see
``scorer``), never Brixia scores: no Brixia labels exist to train or check one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

LUNGS: tuple[str, ...] = ("right", "left")
LEVELS: tuple[str, ...] = ("upper", "middle", "lower")
BRIXIA: dict[tuple[str, str], str] = {(lg, lv): "ABCDEF"[3 * i + j] for i, lg in enumerate(LUNGS)
                                      for j, lv in enumerate(LEVELS)}
LUNG_MAX = 4.0  # geographic extent per lung: 0-4
ESTIMATE_NOTE = ("estimate: per-lung and zone figures spread the whole-image geographic extent over the lung "
                 "boxes by the regressor's spatial map; no per-lung or Brixia labels exist to check them. "
                 "Zones are the Brixia layout (thirds of each lung box), not a Brixia score.")


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


def draw_zones(img: np.ndarray, severity: dict[str, Any], *, caption: bool = True) -> np.ndarray:
    """Draw the six zones with their letter and estimate, and (caption) a band at the bottom saying they are
    estimates, on a BGR uint8 image in original pixels (in place; returned)."""
    h, w = img.shape[:2]
    scale = max(0.35, w / 1100)
    thick = max(1, int(round(scale * 2)))
    for z in severity["zones"]:
        x0, y0, x1, y1 = (int(round(v)) for v in z["box"])
        colour = (0, 200, 255) if z["lung"] == "right" else (255, 200, 0)
        cv2.rectangle(img, (x0, y0), (x1, y1), colour, thick)
        label = f"{z['brixia']} {z['extent_estimate']:.1f}"
        cv2.putText(img, label, (x0 + 4, y0 + int(24 * scale) + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick,
                    cv2.LINE_AA)
    if not caption:
        return img
    pl = severity["per_lung"]
    lines = [f"severity estimate: extent {severity['geographic_extent']:.1f}/8, opacity {severity['opacity']:.1f}/6;"
             f" right {pl['right']:.1f}/4, left {pl['left']:.1f}/4",
             "zones: Brixia layout, estimates, not a Brixia score"]
    step = int(28 * scale) + 6
    top = h - step * len(lines) - 6
    cv2.rectangle(img, (0, top), (w, h), (0, 0, 0), -1)
    for i, line in enumerate(lines):
        width = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0]
        fit = min(scale, scale * (w - 12) / max(width, 1))  # shrink a line that would run off the image
        cv2.putText(img, line, (6, top + step * (i + 1) - 4), cv2.FONT_HERSHEY_SIMPLEX, fit, (255, 255, 255),
                    thick, cv2.LINE_AA)
    return img
