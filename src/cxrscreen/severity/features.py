"""Backbone feature maps of an X-ray and their global averages, the regressor's inputs.

A :class:`FeatureSpec` names the backbone ("model": the classifier the regressor ships with; "imagenet":
the same architecture with its offline ImageNet weights), the preprocessing (its own, not necessarily the
classifier's) and the stages whose maps are read ("blocks.4", ..., "head" = after conv_head + bn2). Each
map is averaged over its positions and the averages are concatenated; because the regressor is linear in
those averages, ``SeverityRegressor.spatial_map`` can spread its prediction back over the positions.
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


@dataclass(frozen=True)
class FeatureSpec:
    """Which features: backbone ("model" | "imagenet"), arch, preprocessing and the stages read."""

    backbone: str = "model"
    arch: str = "tf_efficientnet_lite0"
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(image_size=192, center_fraction=0.9,
                                                                                  mean=0.5, std=0.5))
    blocks: tuple[str, ...] = ("head",)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise CXRError(f"unknown severity backbone {self.backbone!r}; use one of {', '.join(BACKBONES)}")
        for b in self.blocks:
            if b != "head" and not (b.startswith("blocks.") and b[7:].isdigit()):
                raise CXRError(f"unknown feature stage {b!r}; use 'blocks.N' or 'head'")

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "arch": self.arch, "preprocess": self.preprocess.to_dict(),
                "blocks": list(self.blocks)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        return cls(backbone=d["backbone"], arch=d["arch"], preprocess=PreprocessConfig.from_dict(d["preprocess"]),
                   blocks=tuple(d["blocks"]))


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

    @torch.no_grad()
    def maps(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
        """Per stage of the spec, float32 maps (N, C, h, w) of preprocessed uint8 images."""
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

    def pooled(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """(N, D) concatenated global averages of the spec's stages."""
        return pool(self.maps(images, batch_size))


def pool(maps: Sequence[np.ndarray]) -> np.ndarray:
    """(N, sum C) global averages of maps (N, C, h, w)."""
    return np.concatenate([m.mean(axis=(2, 3)) for m in maps], axis=1).astype(np.float64)


def build_backbone(spec: FeatureSpec, model: nn.Module | None = None) -> nn.Module:
    """The backbone of a spec: `model` (the classifier) for "model", else the ImageNet network."""
    if spec.backbone == "model":
        if model is None:
            raise CXRError("this severity regressor reads the classifier's backbone; no classifier was given")
        return model
    from cxrscreen.models.registry import create_model

    return create_model(spec.arch, num_classes=3, in_chans=1, weights="imagenet").eval()
