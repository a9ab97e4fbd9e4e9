"""What is computed from a lung label map (0 background, 1 right lung, 2 left lung; the patient's right is the
image's left): cleaning, per-lung boxes and areas, the six Brixia zones by thirds of each lung's height, the
share of a heat map inside the lungs, Dice and IoU. numpy and OpenCV only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.transforms.ops import Geometry

BACKGROUND, RIGHT, LEFT = 0, 1, 2
LUNG_LABELS: dict[str, int] = {"right": RIGHT, "left": LEFT}
LEVELS: tuple[str, ...] = ("upper", "middle", "lower")
BRIXIA_LETTERS: dict[str, str] = {"right": "ABC", "left": "DEF"}


def largest_component(binary: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean (H, W) map (all False when it is empty)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(binary, dtype=bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def clean_label_map(labels: np.ndarray) -> np.ndarray:
    """Keep each lung's largest connected component and fill its holes: uint8 (H, W) label map."""
    out = np.zeros(labels.shape, np.uint8)
    for k in (RIGHT, LEFT):
        part = largest_component(labels == k)
        if part.any():
            filled = part.astype(np.uint8)
            contours, _ = cv2.findContours(filled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
            out[(filled > 0) & (out == 0)] = k
    return out


def lung_box(mask: np.ndarray, lung: str) -> list[float] | None:
    """[x0, y0, x1, y1] (pixels, half-open) of one lung in a label map, None when that lung is absent."""
    ys, xs = np.nonzero(mask == LUNG_LABELS[lung])
    if not len(xs):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def mask_to_model(mask: np.ndarray, geom: Geometry) -> np.ndarray:
    """A label map at the original size -> the model's (S, S) grid, as `Preprocessor` moves the image
    (crop box, padding, nearest-neighbour resize)."""
    x0, y0, x1, y1 = geom.box
    region = np.ascontiguousarray(mask[y0:y1, x0:x1])
    left, top, right, bottom = geom.pad
    square = cv2.copyMakeBorder(region, top, bottom, left, right, cv2.BORDER_CONSTANT, value=0)
    return cv2.resize(square, (geom.size, geom.size), interpolation=cv2.INTER_NEAREST)


def dilate(binary: np.ndarray, radius: int) -> np.ndarray:
    """A boolean (H, W) map grown by `radius` pixels (elliptical structuring element; 0: unchanged copy)."""
    b = np.asarray(binary, bool)
    if radius <= 0:
        return b.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(b.astype(np.uint8), kernel) > 0


def lung_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The boxes of the lungs present in a label map: boxes (K, 4) float32 [x0, y0, x1, y1] (pixels,
    half-open) and their labels (K,) int64 (1 right, 2 left), right lung first; K = 0 when no lung is found."""
    found = [(k, b) for lg, k in LUNG_LABELS.items() if (b := lung_box(mask, lg)) is not None]
    return (np.array([b for _, b in found], np.float32).reshape(-1, 4), np.array([k for k, _ in found], np.int64))


def lung_fractions(mask: np.ndarray) -> dict[str, float]:
    """{right, left}: each lung's area as a fraction of the image."""
    n = float(mask.size)
    return {lg: float((mask == k).sum()) / n for lg, k in LUNG_LABELS.items()}


def zone_masks(mask: np.ndarray) -> list[dict[str, Any]]:
    """The six Brixia zones: each lung mask cut into upper, middle and lower thirds of its own height.

    Returns six dicts {lung, level, brixia, mask (bool H x W), box [x0, y0, x1, y1]} in the order A-F (right
    lung upper, middle, lower; left lung upper, middle, lower). A lung that is absent gives empty zones with
    box None.
    """
    zones = []
    for lg, k in LUNG_LABELS.items():
        lung = mask == k
        ys = np.nonzero(lung.any(axis=1))[0]
        for j, lv in enumerate(LEVELS):
            zm = np.zeros_like(lung)
            box = None
            if len(ys):
                top, h = int(ys.min()), int(ys.max()) + 1 - int(ys.min())
                a, b = top + int(round(j * h / 3)), top + int(round((j + 1) * h / 3))
                zm[a:b] = lung[a:b]
                cols = np.nonzero(zm.any(axis=0))[0]
                if len(cols):
                    box = [float(cols.min()), float(a), float(cols.max() + 1), float(b)]
            zones.append({"lung": lg, "level": lv, "brixia": BRIXIA_LETTERS[lg][j], "mask": zm, "box": box})
    return zones


def heat_share_inside(heat: np.ndarray, region: np.ndarray) -> float | None:
    """Share of a non-negative heat map's mass that lies inside a boolean region (same shape); None when the
    heat map holds no mass."""
    h = np.clip(np.asarray(heat, np.float64), 0, None)
    total = h.sum()
    if total <= 0:
        return None
    return float(h[np.asarray(region, bool)].sum() / total)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two boolean maps; (1, 1) when both are empty."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    inter = float((p & t).sum())
    s = float(p.sum() + t.sum())
    union = float((p | t).sum())
    if s == 0:
        return 1.0, 1.0
    return 2 * inter / s, inter / union


def read_mask(path: str | Path, shape: Sequence[int] | None = None) -> np.ndarray:
    """A lung label PNG (0 / 1 / 2) as uint8 (H, W); CXRError naming the file when it is unreadable, holds
    other values, or (given `shape`) has another size."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise CXRError("cannot read the lung mask PNG", path)
    if img.ndim != 2:
        raise CXRError(f"a lung mask must be a one-channel label map, not shape {img.shape}", path)
    if img.max() > LEFT:
        raise CXRError(f"a lung mask holds labels 0, 1, 2, not {int(img.max())}", path)
    if shape is not None and tuple(img.shape) != tuple(shape[:2]):
        raise CXRError(f"lung mask size {img.shape} differs from the image's {tuple(shape[:2])}", path)
    return img.astype(np.uint8)


def write_mask(mask: np.ndarray, path: str | Path) -> Path:
    """Write a label map (0 / 1 / 2) as an 8-bit PNG (folders are created); CXRError naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.asarray(mask, np.uint8)):
        raise CXRError("could not write the lung mask PNG", path)
    return path


def draw_masks(pixels: np.ndarray, mask: np.ndarray, *, zones: bool = True) -> np.ndarray:
    """BGR uint8 picture of a grey X-ray (float [0, 1]) with the right lung tinted orange, the left blue, their
    outlines, and (zones) the cuts between each lung's thirds with the zone letters."""
    grey = np.clip(np.asarray(pixels, np.float32) * 255.0, 0, 255).astype(np.uint8)
    img = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    colours = {RIGHT: (0, 140, 255), LEFT: (255, 160, 0)}
    thick = max(1, round(max(mask.shape) / 300))
    for k, colour in colours.items():
        m = mask == k
        img[m] = (0.7 * img[m] + 0.3 * np.array(colour)).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, colour, thick)
    if zones:
        scale = max(0.35, mask.shape[1] / 1100)
        for z in zone_masks(mask):
            if z["box"] is None:
                continue
            x0, y0, x1, y1 = (int(round(v)) for v in z["box"])
            colour = colours[LUNG_LABELS[z["lung"]]]
            if z["level"] != "upper":
                cv2.line(img, (x0, y0), (x1, y0), colour, thick)
            cv2.putText(img, z["brixia"], ((x0 + x1) // 2 - 6, (y0 + y1) // 2 + 6), cv2.FONT_HERSHEY_SIMPLEX,
                        scale, colour, thick, cv2.LINE_AA)
    return img
