"""Fixtures for the data-layer tests: the real data set (read in place) and tiny generated images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrscreen.data.manifest import read_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
CXR_DIR = REPO_ROOT / "../shared/data/cxr"


@pytest.fixture(scope="session")
def cxr_dir() -> Path:
    """<repo root>/../shared/data/cxr, the real data set; skips the test when it is absent."""
    if not (CXR_DIR / "manifest.csv").is_file():
        pytest.skip(
            f"real data set not found at {CXR_DIR.resolve()} (expected <repo root>/../shared/data/cxr)"
        )
    return CXR_DIR


@pytest.fixture(scope="session")
def real_manifest(cxr_dir: Path) -> pd.DataFrame:
    """The real manifest (2,989 rows)."""
    return read_manifest(cxr_dir)


def write_png(path: Path, seed: int, size: int = 8) -> Path:
    """Write a tiny grey PNG whose bytes depend on ``seed``; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture()
def png() -> Callable[[Path, int], Path]:
    """The :func:`write_png` helper."""
    return write_png
