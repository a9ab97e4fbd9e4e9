"""overlay: every picture the package draws: heat map over the X-ray, text band, detection boxes, and
their PNG encoding (to a file, or base64 for the web page)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cxrscreen.errors import CXRError


def overlay(pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grey X-ray (H, W) in [0, 1] and a heat map (H, W) in [0, 1] -> BGR uint8 (H, W, 3) overlay."""
    grey = np.clip(pixels * 255.0, 0, 255).astype(np.uint8)
    base = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    colour = cv2.applyColorMap(np.clip(heat * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    weight = (alpha * np.clip(heat, 0, 1) ** 0.5)[..., None]
    return (base * (1 - weight) + colour * weight).astype(np.uint8)


def encode_png(img: np.ndarray, where: str | Path | None = None, what: str = "PNG") -> bytes:
    """PNG bytes of an image (grey or BGR uint8); CXRError naming ``where`` when it cannot be encoded."""
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise CXRError(f"could not encode the {what}", where)
    return buf.tobytes()


def write_png(img: np.ndarray, path: str | Path) -> Path:
    """Write an image (grey or BGR uint8) as PNG (folders are created); CXRError naming the file on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise CXRError("could not write the image", path)
    return path


def png_base64(img: np.ndarray, where: str | Path | None = None) -> str:
    """An image (grey or BGR uint8, e.g. a task drawer's picture) as a base64 PNG for the web page and API;
    CXRError naming ``where`` when it cannot be encoded."""
    return base64.b64encode(encode_png(img, where, "heatmap PNG")).decode("ascii")


def with_band(img: np.ndarray, lines: Sequence[str], *, where: str = "top") -> np.ndarray:
    """A new BGR image: `img` with a black band of text lines added above (where="top") or below ("bottom"),
    so that no caption covers the X-ray. The X-ray's pixels keep their coordinates plus the top band's height
    (`band_height(img, lines)`)."""
    if not lines:
        return img
    h, w = img.shape[:2]
    scale = max(0.35, w / 1100)
    thick = max(1, int(round(scale * 2)))
    step = int(28 * scale) + 6
    band = np.zeros((band_height(img, lines), w, 3), np.uint8)
    for i, line in enumerate(lines):
        width = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0]
        fit = min(scale, scale * (w - 12) / max(width, 1))  # shrink a line that would run off the picture
        cv2.putText(band, line, (6, step * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, fit, (255, 255, 255), thick,
                    cv2.LINE_AA)
    return np.concatenate([band, img] if where == "top" else [img, band], axis=0)


def band_height(img: np.ndarray, lines: Sequence[str]) -> int:
    """Height in pixels of the text band `with_band` adds for `lines` to an image of img's width."""
    scale = max(0.35, img.shape[1] / 1100)
    return (int(28 * scale) + 6) * len(lines) + 8


_COLOURS = [(60, 60, 230), (60, 200, 60), (230, 150, 40), (200, 60, 200), (40, 200, 230)]  # BGR


def draw_boxes(pixels: np.ndarray, boxes: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write `boxes_picture(pixels, boxes)` as PNG to `path` (folders are created); returns the path."""
    return write_png(boxes_picture(pixels, boxes), path)


def boxes_picture(pixels: np.ndarray, boxes: Sequence[dict[str, Any]]) -> np.ndarray:
    """A grey image (H, W; float in [0, 1] or uint8) with boxes, class and score: BGR uint8 (H, W, 3).

    boxes: dicts with "box" (x0, y0, x1, y1 in the image's pixels), "class" and "score", as in
    ``result_boxes``.
    """
    img = np.asarray(pixels)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    canvas = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    thick = max(1, round(max(img.shape) / 300))
    names: dict[str, int] = {}
    for b in boxes:
        colour = _COLOURS[names.setdefault(str(b["class"]), len(names)) % len(_COLOURS)]
        x0, y0, x1, y1 = (round(float(v)) for v in b["box"])
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, thick)
        text = f"{b['class']} {100 * float(b['score']):.0f}%"
        scale = 0.4 * thick
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = max(th + base, y0)
        cv2.rectangle(canvas, (x0, ty - th - base), (x0 + tw, ty), colour, -1)
        cv2.putText(canvas, text, (x0, ty - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
    return canvas

