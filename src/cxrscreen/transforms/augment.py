"""The training and evaluation presets: augmentation options and the tensor transforms built from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from cxrscreen.transforms.preprocess import PreprocessConfig


@dataclass
class AugmentConfig:
    """Training augmentation strengths; all act on the preprocessed square image.

    The defaults aim at what differs between hospitals rather than between diseases: framing,
    exposure and contrast, blur, and occluding patches (burned-in text, markers).
    """

    degrees: float = 10.0
    translate: float = 0.06
    scale: tuple[float, float] = (0.9, 1.15)
    brightness: float = 0.3
    contrast: float = 0.3
    blur_p: float = 0.2
    erase_p: float = 0.25


def train_transform(config: PreprocessConfig, aug: AugmentConfig | None = None) -> v2.Compose:
    """Augmenting transform: uint8 tensor (1, S, S) -> normalised float tensor (1, S, S)."""
    aug = aug or AugmentConfig()
    return v2.Compose(
        [
            v2.RandomAffine(degrees=aug.degrees, translate=(aug.translate, aug.translate), scale=aug.scale),
            v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast),
            v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=aug.blur_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([config.mean], [config.std]),
            v2.RandomErasing(p=aug.erase_p, scale=(0.02, 0.08), value=0.0),
        ]
    )


def eval_transform(config: PreprocessConfig) -> v2.Compose:
    """Deterministic transform: uint8 tensor (1, S, S) -> normalised float tensor (1, S, S)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([config.mean], [config.std])])

