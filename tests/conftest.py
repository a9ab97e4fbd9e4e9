"""Shared fixtures: the real data folder (read in place, never copied) and small generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO / ".." / "shared" / "data" / "cxr").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data/cxr (skips when absent)."""
    if not (DATA_DIR / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture()
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def synthetic_cxr(h: int = 256, w: int = 256, lesion: tuple[int, int] | None = None, seed: int = 0) -> np.ndarray:
    """A chest-X-ray-like float image in [0, 1]: dark lungs in a bright body, optional bright blob (lesion)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 0.75, np.float32)
    for cx in (0.3 * w, 0.7 * w):
        m = ((xx - cx) / (0.17 * w)) ** 2 + ((yy - 0.5 * h) / (0.32 * h)) ** 2 < 1
        img[m] = 0.25
    if lesion is not None:
        ly, lx = lesion
        img += 0.6 * np.exp(-(((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * (0.05 * w) ** 2)))
    img += rng.normal(0, 0.02, (h, w)).astype(np.float32)
    return np.clip(img, 0, 1)
