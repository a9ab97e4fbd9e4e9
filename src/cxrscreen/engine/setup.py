"""Run setup: seeds, the device, torch threads and the preprocessed-image cache of a config."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir

if TYPE_CHECKING:
    from cxrscreen.training.config import TrainConfig


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_run(cfg: TrainConfig) -> tuple[torch.device, PreprocessedCache]:
    """Before a run: torch threads, every seed, the device and the preprocessed-image cache of cfg."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    cache = PreprocessedCache(cfg.preprocess, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    return pick_device(cfg.device), cache

