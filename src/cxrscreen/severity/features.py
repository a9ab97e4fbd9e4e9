"""Backbone feature maps of an X-ray and their global averages, the regressor's inputs.

A :class:`FeatureSpec` names the backbone ("model": the classifier the regressor ships with; "imagenet":
the same architecture with its offline ImageNet weights), the preprocessing (its own, not necessarily the
classifier's) and the stages whose maps are read ("blocks.4", ..., "head" = after conv_head + bn2), the
regions each map is averaged over (``pooling``: "image", the whole map; "lungs", the atlas boxes of the
right and left lung, each averaged separately; "lung_masks", the segmented right and left lung, each map cell
weighted by the share of it the lung covers, the atlas box standing in for a lung not found) and whether the
maps of the horizontally flipped image, flipped back, are averaged in (``flip``). The region averages are
concatenated (region-major, then stage); because the regressor is linear in those averages,
``SeverityRegressor.spatial_map`` can spread its prediction back over the positions. For "lung_masks" the scorer
segments the X-ray with the bundled lung segmenter (`SeverityScorer.score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrscreen.errors import CXRError
from cxrscreen.transforms.preprocess import Geometry, PreprocessConfig, Preprocessor, to_model_tensor

BACKBONES = ("model", "imagenet")
POOLINGS: dict[str, tuple[str, ...]] = {"image": ("image",), "lungs": ("right", "left"),
                                        "lung_masks": ("right", "left")}  # pooling -> regions
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class FeatureSpec:
    """Which features: backbone ("model" | "imagenet"), arch, preprocessing, the stages read, the regions
    averaged ("image" | "lungs") and flip averaging."""

    backbone: str = "model"
    arch: str = "tf_efficientnet_lite0"
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(image_size=192, center_fraction=0.9,
                                                                                  mean=0.5, std=0.5))
    blocks: tuple[str, ...] = ("head",)
    pooling: str = "image"
    flip: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise CXRError(f"unknown severity backbone {self.backbone!r}; use one of {', '.join(BACKBONES)}")
        if self.pooling not in POOLINGS:
            raise CXRError(f"unknown severity pooling {self.pooling!r}; use one of {', '.join(POOLINGS)}")
        for b in self.blocks:
            if b != "head" and not (b.startswith("blocks.") and b[7:].isdigit()):
                raise CXRError(f"unknown feature stage {b!r}; use 'blocks.N' or 'head'")

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "arch": self.arch, "preprocess": self.preprocess.to_dict(),
                "blocks": list(self.blocks), "pooling": self.pooling, "flip": self.flip}

    @property
    def regions(self) -> tuple[str, ...]:
        """Names of the regions whose averages make the features, in order."""
        return POOLINGS[self.pooling]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(backbone=d["backbone"], arch=d["arch"], preprocess=PreprocessConfig.from_dict(d["preprocess"]),
                   blocks=tuple(d["blocks"]), pooling=d.get("pooling", "image"), flip=bool(d.get("flip", False)))


class FeatureExtractor:
    """Feature maps of a timm EfficientNet(-Lite) for preprocessed images (grey, one channel)."""

    def __init__(self, module: nn.Module, spec: FeatureSpec) -> None:
        for part in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"):
            if not hasattr(module, part):
                raise CXRError(f"severity features need a timm EfficientNet backbone; {type(module).__name__} "
                               f"has no {part!r}")
        self.module = module.eval()
        self.spec = spec
        self.preprocessor = Preprocessor(spec.preprocess)
        self.device = next(module.parameters()).device
        wanted = [int(b[7:]) for b in spec.blocks if b != "head"]
        if wanted and max(wanted) >= len(module.blocks):
            raise CXRError(f"the backbone has {len(module.blocks)} blocks; asked for blocks.{max(wanted)}")

    def prepare(self, pixels: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """Decoded X-ray (float32 [0, 1], H x W) -> uint8 model image and its geometry."""
        return self.preprocessor(pixels)

    def regions(self, geom: Geometry) -> list[Box]:
        """The spec's regions of one image in model pixels: the whole input, or the atlas boxes of its right
        and left lung (from the original image's shape, mapped through its geometry)."""
        if self.spec.pooling == "image":
            return [(0.0, 0.0, float(geom.size), float(geom.size))]
        from cxrscreen.data.lung_boxes import DEFAULT_ATLAS, LEFT, RIGHT, atlas_boxes

        atlas = atlas_boxes(DEFAULT_ATLAS, geom.original_hw)
        return [geom.box_to_model(tuple(float(v) for v in atlas.boxes[list(atlas.lungs).index(k)]))  # type: ignore[arg-type]
                for k in (RIGHT, LEFT)]

    def maps(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
        """Per stage of the spec, float32 maps (N, C, h, w) of preprocessed uint8 images; with ``flip``, the
        mean of the image's maps and the flipped image's maps flipped back."""
        maps = self._maps(images, batch_size)
        if self.spec.flip:
            mirrored = self._maps([np.ascontiguousarray(im[:, ::-1]) for im in images], batch_size)
            maps = [(m + f[..., ::-1]) / 2 for m, f in zip(maps, mirrored, strict=True)]
        return maps

    def features(self, maps: Sequence[np.ndarray], geoms: Sequence[Geometry],
                 lung_masks: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """(N, D) region averages of maps (N, C, h, w) of images with these geometries; "lung_masks" pooling
        needs each image's lung label map on the model's input grid (`lungs.masks.mask_to_model`)."""
        size = self.spec.preprocess.image_size
        if self.spec.pooling != "lung_masks":
            return pool(maps, [self.regions(g) for g in geoms], size)
        if lung_masks is None or len(lung_masks) != len(geoms):
            raise CXRError("lung-mask pooling needs one lung label map per image")
        return pool_weighted(maps, [self.lung_weights(m, g) for m, g in zip(lung_masks, geoms, strict=True)])

    def lung_weights(self, model_mask: np.ndarray, geom: Geometry) -> list[np.ndarray]:
        """[right, left] float32 (S, S) weights on the model's input grid: 1 inside the segmented lung, 0
        outside; a lung the segmenter did not find falls back to its atlas box."""
        from cxrscreen.lungs.masks import LUNG_LABELS

        size = self.spec.preprocess.image_size
        atlas = None
        out = []
        for lg in ("right", "left"):
            w = (np.asarray(model_mask) == LUNG_LABELS[lg]).astype(np.float32)
            if not w.any():
                if atlas is None:
                    atlas = _AtlasBoxes(self, geom)
                w = atlas.weight(lg, size)
            out.append(w)
        return out

    @torch.no_grad()
    def _maps(self, images: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
        outs: list[list[np.ndarray]] = [[] for _ in self.spec.blocks]
        m = self.module
        for i in range(0, len(images), batch_size):
            x = torch.stack([to_model_tensor(im, self.spec.preprocess) for im in images[i:i + batch_size]])
            x = m.bn1(m.conv_stem(x.to(self.device)))
            got: dict[str, torch.Tensor] = {}
            for j, blk in enumerate(m.blocks):
                x = blk(x)
                got[f"blocks.{j}"] = x
            got["head"] = m.bn2(m.conv_head(x))
            for k, b in enumerate(self.spec.blocks):
                outs[k].append(got[b].float().cpu().numpy())
        return [np.concatenate(o) for o in outs]



def region_cells(box: Box, hw: tuple[int, int], size: int) -> tuple[slice, slice]:
    """Rows and columns of an (h, w) map of a size x size input that a box (model pixels) covers; at least
    one cell, inside the map."""
    h, w = hw
    x0, y0, x1, y1 = box

    def span(a: float, b: float, n: int) -> slice:
        lo = int(np.clip(np.floor(a * n / size), 0, n - 1))
        return slice(lo, int(np.clip(np.ceil(b * n / size), lo + 1, n)))

    return span(y0, y1, h), span(x0, x1, w)


def pool(maps: Sequence[np.ndarray], regions: Sequence[Sequence[Box]] | None = None,
         size: int | None = None) -> np.ndarray:
    """(N, R x sum C) averages of maps (N, C, h, w) over each image's R regions (boxes in the pixels of a
    size x size input; None: the whole map), region-major."""
    if regions is None:
        return np.concatenate([m.mean(axis=(2, 3)) for m in maps], axis=1).astype(np.float64)
    if size is None:
        raise CXRError("region pooling needs the input size")
    rows = []
    for i, boxes in enumerate(regions):
        parts = []
        for box in boxes:
            for m in maps:
                ys, xs = region_cells(box, m.shape[2:], size)
                parts.append(m[i, :, ys, xs].mean(axis=(1, 2)))
        rows.append(np.concatenate(parts))
    return np.stack(rows).astype(np.float64)


class _AtlasBoxes:
    """The atlas boxes of one image (model pixels) as filled weight maps."""

    def __init__(self, ext: FeatureExtractor, geom: Geometry) -> None:
        self.boxes = dict(zip(("right", "left"), FeatureExtractor(ext.module, FeatureSpec(
            ext.spec.backbone, ext.spec.arch, ext.spec.preprocess, ext.spec.blocks, "lungs")).regions(geom),
            strict=True))

    def weight(self, lung: str, size: int) -> np.ndarray:
        ys, xs = region_cells(self.boxes[lung], (size, size), size)
        w = np.zeros((size, size), np.float32)
        w[ys, xs] = 1.0
        return w


def pool_weighted(maps: Sequence[np.ndarray], weights: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """(N, R x sum C) weighted averages of maps (N, C, h, w), region-major: image i's R weight maps (S, S) on
    the model's input grid are area-resized to each map's (h, w) (the share of each cell they cover)."""
    import cv2

    rows = []
    for i, regions in enumerate(weights):
        parts = []
        for wt in regions:
            for m in maps:
                h, w = m.shape[2:]
                cell = cv2.resize(np.asarray(wt, np.float32), (w, h), interpolation=cv2.INTER_AREA)
                total = float(cell.sum())
                if total <= 0:
                    raise CXRError("an empty pooling region")
                parts.append((m[i] * cell).sum(axis=(1, 2)) / total)
        rows.append(np.concatenate(parts))
    return np.stack(rows).astype(np.float64)


def build_backbone(spec: FeatureSpec, model: nn.Module | None = None) -> nn.Module:
    """The backbone of a spec: `model` (the classifier) for "model", else the ImageNet network."""
    if spec.backbone == "model":
        if model is None:
            raise CXRError("this severity regressor reads the classifier's backbone; no classifier was given")
        return model
    from cxrscreen.models.registry import create_model

    return create_model(spec.arch, num_classes=3, in_chans=1, weights="imagenet").eval()
