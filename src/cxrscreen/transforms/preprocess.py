"""Preprocessing (CLAHE, square crop or pad, resize) and the train / eval presets built from one config.

The preprocessing stored with a model (`PreprocessConfig`) is the single source of truth: training,
evaluation, prediction and the heatmaps all call `Preprocessor(config)` so that a model never sees
another input range or geometry than the one it was trained on.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cxrscreen.transforms.ops import (  # noqa: F401  (re-exported: the one import path of preprocessing)
    ApplyCLAHE,
    CenterCropSquare,
    Geometry,
    PadToSquare,
    PreprocessConfig,
    ResizeMode,
    ResizeSquare,
    SquarePreprocessor,
    to_model_array,
    to_model_tensor,
)


def lungs_box(pixels: np.ndarray, margin: float, source: str = "mask") -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the box around both segmented lungs of a grey X-ray, widened by `margin` of its width
    and height on each side and clipped to the image; the whole image when no lung is found. `source`: "mask"
    reads it on the full-size mask, "grid" on the segmenter's grid scaled to the image (`PreprocessConfig.lung_box`)."""
    from cxrscreen.lungs.segmenter import bundled_segmenter

    h, w = pixels.shape
    result = bundled_segmenter().segment(pixels)
    labels = result.grid if source == "grid" else result.mask
    ys, xs = np.nonzero(labels)
    if not len(xs):
        return 0, 0, w, h
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    if source == "grid":  # grid cells -> image pixels (the grid covers the whole image)
        sx, sy = w / labels.shape[1], h / labels.shape[0]
        x0, x1 = int(np.floor(x0 * sx)), min(w, int(np.ceil(x1 * sx)))
        y0, y1 = int(np.floor(y0 * sy)), min(h, int(np.ceil(y1 * sy)))
    mx, my = int(round(margin * (x1 - x0))), int(round(margin * (y1 - y0)))
    return max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)


class Preprocessor(SquarePreprocessor):
    """Decoded X-ray (float32 [0, 1], H x W) -> uint8 (size x size) model image plus its Geometry, in every
    resize mode ("crop", "pad", "lungs")."""

    def region(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        if self.config.resize_mode != "lungs":
            return super().region(pixels)
        box = lungs_box(pixels, self.config.lung_margin, self.config.lung_box)
        return pixels[box[1] : box[3], box[0] : box[2]], box


# ---------------------------------------------------------------------------------------------- geometry
def geometry_for(config: PreprocessConfig, hw: tuple[int, int]) -> Geometry:
    """The Geometry that ``Preprocessor(config)`` gives an image of shape hw (without decoding it). ValueError
    for the "lungs" mode, whose geometry depends on the image's content."""
    if config.resize_mode == "lungs":
        raise ValueError("the 'lungs' resize mode's geometry depends on the image; preprocess the image itself")
    pre = Preprocessor(dataclasses.replace(config, clahe=False))
    return pre(np.zeros(hw, np.float32))[1]
