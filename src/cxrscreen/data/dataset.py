"""Decoded, preprocessed images in memory, with an on-disk cache, and the torch Dataset over them.

Decoding a 512-1024 px image and running CLAHE costs more than a small model's training step on a
CPU, so each preprocessed image is cached as a .npy file keyed by the file's content hash and the
preprocessing (`PreprocessConfig.cache_key()`): epochs after the first, and later runs with the same
preprocessing, never decode again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class XRayTensorDataset(Dataset):
    """In-memory images with integer labels: item -> (float tensor (1, S, S), label)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = torch.from_numpy(images)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i].unsqueeze(0)), self.labels[i]

