"""The building blocks of preprocessing: the config, the geometry that undoes it, crop / pad / resize / CLAHE,
the square preprocessor (crop and pad modes) and the model tensors. ``transforms.preprocess`` re-exports all of
it and adds the "lungs" resize mode, which needs the lung segmenter (itself preprocessed by these blocks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

ResizeMode = Literal["crop", "pad", "lungs"]


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that turns a decoded X-ray into the model's input.

    image_size: side of the square model input, pixels.
    clahe: apply CLAHE (contrast-limited adaptive histogram equalisation) after resizing.
    clahe_clip_limit, clahe_tile_grid: OpenCV's clipLimit and tileGridSize (tiles per side).
    resize_mode: "crop" takes a centred square (no bars that reveal the source), "pad" pads to a square,
        "lungs" crops to the bounding box of both lungs (the bundled lung segmenter, `cxrscreen.lungs`) widened
        by `lung_margin` of its size on every side, then pads that to a square (the whole image, padded, when
        no lung is found).
    center_fraction: side of the centred crop as a fraction of the short side (1.0 = whole short side);
        below 1 it trims borders and corners, where burned-in text and markers sit.
    mean, std: normalisation of the [0, 1] grey values fed to the network.
    lung_margin: "lungs" mode's margin around the lungs' box, as a fraction of the box's width and height.
    lung_box: where "lungs" mode reads the lungs' box: "mask", the segmented lungs at the image's full size (every
        `lungs` figure of docs/results/select_* was measured so), or "grid", the segmenter's own 128 px grid scaled
        to the image (no full-size mask: several times cheaper, the box within a grid cell of the other). Left
        out of `to_dict` (and so of every cache key) when "mask", so configs and caches written before it exist
        stay what they were.
    """

    image_size: int = 224
    clahe: bool = True
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    resize_mode: ResizeMode = "crop"
    center_fraction: float = 1.0
    mean: float = 0.5
    std: float = 0.25
    lung_margin: float = 0.1
    lung_box: Literal["mask", "grid"] = "mask"

    def __post_init__(self) -> None:
        if self.lung_box not in ("mask", "grid"):
            raise ValueError(f"lung_box must be 'mask' or 'grid', not {self.lung_box!r}")
        if self.resize_mode not in ("crop", "pad", "lungs"):
            raise ValueError(f"resize_mode must be 'crop', 'pad' or 'lungs', not {self.resize_mode!r}")
        if not 0.0 <= self.lung_margin <= 1.0:
            raise ValueError(f"lung_margin must lie in [0, 1], not {self.lung_margin}")
        if not 0.3 <= self.center_fraction <= 1.0:
            raise ValueError(f"center_fraction must lie in [0.3, 1], not {self.center_fraction}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, not {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["lung_box"] == "mask":  # the default, as before the field existed
            d.pop("lung_box")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def cache_key(self) -> str:
        """Hash of the fields that change the cached (pre-augmentation) image."""
        fields = {k: v for k, v in self.to_dict().items() if k not in ("mean", "std")}
        if self.resize_mode != "lungs":  # keys of the crop and pad modes stay what they were
            fields.pop("lung_margin")
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from in the original image (pixels of the original).

    The model input is the region `box = (x0, y0, x1, y1)` of the original, padded by `pad`
    (left, top, right, bottom) to a square of side `square`, then resized to `size` x `size`.
    """

    original_hw: tuple[int, int]
    box: tuple[int, int, int, int]
    pad: tuple[int, int, int, int]
    square: int
    size: int

    def to_original(self, heat: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Map a (size, size) map from model space back onto the original image grid (H, W)."""
        h, w = self.original_hw
        sq = cv2.resize(heat.astype(np.float32), (self.square, self.square), interpolation=cv2.INTER_LINEAR)
        left, top, right, bottom = self.pad
        region = sq[top : self.square - bottom, left : self.square - right]
        out = np.full((h, w), fill, dtype=np.float32)
        x0, y0, x1, y1 = self.box
        out[y0:y1, x0:x1] = region
        return out

    def box_to_original(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Map an (x0, y0, x1, y1) box in model pixels to original pixels."""
        s = self.square / self.size
        left, top, _, _ = self.pad
        bx0, by0 = self.box[0], self.box[1]
        x0, y0, x1, y1 = box
        return (x0 * s - left + bx0, y0 * s - top + by0, x1 * s - left + bx0, y1 * s - top + by0)

    def box_to_model(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Map an (x0, y0, x1, y1) box in original pixels to model pixels (may fall outside the input)."""
        s = self.size / self.square
        left, top, _, _ = self.pad
        bx0, by0 = self.box[0], self.box[1]
        x0, y0, x1, y1 = box
        return ((x0 - bx0 + left) * s, (y0 - by0 + top) * s, (x1 - bx0 + left) * s, (y1 - by0 + top) * s)


class CenterCropSquare:
    """Crop the centred square of side `fraction` x short side. Returns the crop and its box."""

    def __init__(self, fraction: float = 1.0) -> None:
        self.fraction = fraction

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        side = max(1, int(round(min(h, w) * self.fraction)))
        x0, y0 = (w - side) // 2, (h - side) // 2
        return x0, y0, x0 + side, y0 + side

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        x0, y0, x1, y1 = self.box(*img.shape[:2])
        return img[y0:y1, x0:x1], (x0, y0, x1, y1)


class PadToSquare:
    """Pad with zeros (black) to a square, image centred. Returns the square and the pad widths."""

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        h, w = img.shape[:2]
        side = max(h, w)
        left, top = (side - w) // 2, (side - h) // 2
        right, bottom = side - w - left, side - h - top
        out = np.zeros((side, side), dtype=img.dtype)
        out[top : top + h, left : left + w] = img
        return out, (left, top, right, bottom)


class ResizeSquare:
    """Resize a square float image to `size` x `size` (area interpolation when shrinking)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: np.ndarray) -> np.ndarray:
        interp = cv2.INTER_AREA if img.shape[0] > self.size else cv2.INTER_LINEAR
        return cv2.resize(img, (self.size, self.size), interpolation=interp)


class ApplyCLAHE:
    """Contrast-limited adaptive histogram equalisation (OpenCV) on an 8-bit grey image.

    Thread-safe: an OpenCV CLAHE object keeps per-call state (its lookup tables) and gives wrong
    output when two threads apply one object at once, so each call creates its own (no measurable
    cost: 39 us per 128 px image either way).
    """

    def __init__(self, clip_limit: float = 2.0, tile_grid: int = 8) -> None:
        self.clip_limit = clip_limit
        self.tile_grid = tile_grid

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if img.dtype != np.uint8:
            raise TypeError(f"CLAHE expects uint8, got {img.dtype}")
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tile_grid, self.tile_grid))
        return clahe.apply(img)


class SquarePreprocessor:
    """Decoded X-ray (float32 [0, 1], H x W) -> uint8 (size x size) model image plus its Geometry, for the
    "crop" and "pad" modes; ``transforms.preprocess.Preprocessor`` adds "lungs" (its `region` override)."""

    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self.crop = CenterCropSquare(config.center_fraction)
        self.pad = PadToSquare()
        self.resize = ResizeSquare(config.image_size)
        self.clahe = ApplyCLAHE(config.clahe_clip_limit, config.clahe_tile_grid) if config.clahe else None

    def region(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """The part of the image that is resized, and its box (x0, y0, x1, y1): the centred square ("crop"),
        else the whole image."""
        if self.config.resize_mode == "crop":
            return self.crop(pixels)
        if self.config.resize_mode == "lungs":
            raise ValueError("the 'lungs' resize mode needs transforms.preprocess.Preprocessor")
        h, w = pixels.shape
        return pixels, (0, 0, w, h)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, Geometry]:
        if pixels.ndim != 2:
            raise ValueError(f"expected a 2-D grey image, got shape {pixels.shape}")
        h, w = pixels.shape
        region, box = self.region(pixels)
        if self.config.resize_mode == "crop" or region.shape[0] == region.shape[1]:
            square, pad = region, (0, 0, 0, 0)
        else:
            square, pad = self.pad(region)
        small = self.resize(np.ascontiguousarray(square, dtype=np.float32))
        img = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
        if self.clahe is not None:
            img = self.clahe(img)
        geom = Geometry(original_hw=(h, w), box=box, pad=pad, square=square.shape[0], size=self.config.image_size)
        return img, geom


def to_model_tensor(img_u8: np.ndarray | torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 (H, W) or (1, H, W) -> normalised float32 (1, H, W)."""
    import torch  # here, not at the top: the ONNX Runtime engine preprocesses without torch

    t = torch.as_tensor(img_u8)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    return (t.float() / 255.0 - config.mean) / config.std


def to_model_array(images_u8: np.ndarray | list[np.ndarray], config: PreprocessConfig) -> np.ndarray:
    """uint8 squares (N, S, S) -> the normalised float32 batch (N, 1, S, S) that `to_model_tensor` gives, in
    numpy (the ONNX Runtime engine's input)."""
    x = np.asarray(images_u8, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    return ((x / np.float32(255.0) - np.float32(config.mean)) / np.float32(config.std)).astype(np.float32)
