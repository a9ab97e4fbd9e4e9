"""Boxes through the preprocessing: original pixels to the model's square, and the SSD augmentation that
moves images and their boxes together (photometric, zoom-out, IoU crop, flip)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from cxrscreen.transforms.preprocess import Geometry


# ------------------------------------------------------------------------------------------------ boxes
def boxes_to_model(geom: Geometry, boxes: np.ndarray, min_side: float = 2.0, *,
                   dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Original-pixel boxes (K, 4) x0 y0 x1 y1 -> model-pixel boxes clipped to [0, size].

    Returns (boxes (M, 4) of ``dtype``, kept (M,) indices into the input): boxes with a side below
    ``min_side`` model pixels after clipping (e.g. cut away by a centre crop) are dropped.
    """
    boxes = np.asarray(boxes, dtype).reshape(-1, 4)
    out = np.array([geom.box_to_model(tuple(b)) for b in boxes], dtype).reshape(-1, 4)
    out = np.clip(out, 0, geom.size)
    keep = np.flatnonzero(((out[:, 2] - out[:, 0]) >= min_side) & ((out[:, 3] - out[:, 1]) >= min_side))
    return out[keep], keep


class FlipBoxes:
    """Horizontal flip with probability p of an image and its boxes, optionally swapping labels.

    ``swap`` maps labels that change under a flip (the image's right lung appears on the viewer's left,
    so a flipped right lung is drawn where a left lung would be): {1: 2, 2: 1} for the localizer, None
    for the detector (its label is the image's class). Input / output: dict sample with "image",
    "boxes" (tv_tensors.BoundingBoxes) and "labels".
    """

    def __init__(self, p: float = 0.5, swap: dict[int, int] | None = None) -> None:
        self.p = p
        self.swap = swap

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if torch.rand(()) >= self.p:
            return sample
        out = dict(sample)
        out["image"] = tvf.horizontal_flip(sample["image"])
        out["boxes"] = tvf.horizontal_flip(sample["boxes"])
        if self.swap:
            labels = sample["labels"].clone()
            for a, b in self.swap.items():
                labels[sample["labels"] == a] = b
            out["labels"] = labels
        return out


class DetectionAugment:
    """The SSD paper's augmentation on grey squares, with torchvision.transforms.v2.

    Photometric distortion (brightness / contrast; saturation, hue and channel order do nothing on one
    channel), zoom-out onto a mid-grey canvas (p 0.5, up to 4x), then either the whole image or an IoU
    crop (min IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9 or a free patch, size [0.1, 1] of the side), boxes
    sanitised (dropped when cut away), a horizontal flip (``FlipBoxes``), and a resize back to S x S.
    Input: uint8 (1, S, S), boxes (K, 4) model pixels, labels (K,). Output: float image (1, S, S) in
    [0, 1] and the target dict {"boxes": float32 (M, 4), "labels": int64 (M,)}.
    """

    def __init__(self, size: int, *, swap: dict[int, int] | None = None) -> None:
        self.size = size
        self.photometric = v2.RandomPhotometricDistort(p=0.5)
        self.zoom_out = v2.RandomZoomOut(fill={tv_tensors.Image: 128, "others": 0}, side_range=(1.0, 4.0), p=0.5)
        self.crop = v2.RandomIoUCrop(min_scale=0.1, max_scale=1.0,
                                     sampler_options=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 2.0])
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=2.0)
        self.flip = FlipBoxes(0.5, swap)
        self.resize = v2.Resize((size, size), antialias=True)

    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = image.shape[-1]
        sample: dict[str, Any] = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes.float().reshape(-1, 4), format="XYXY", canvas_size=(s, s)),
            "labels": labels.long(),
        }
        sample = self.photometric(sample)
        sample = self.zoom_out(sample)
        if len(sample["boxes"]):
            sample = self.crop(sample)
        sample = self.sanitize(sample)
        sample = self.flip(sample)
        sample = self.resize(sample)
        sample = self.sanitize(sample)
        img = tvf.to_dtype(sample["image"], torch.float32, scale=True).as_subclass(torch.Tensor)
        target = {"boxes": sample["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
                  "labels": sample["labels"].long()}
        return img, target

