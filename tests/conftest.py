"""Shared fixtures: the real data folder (read in place, never copied) and small generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrscreen.data.splits import split_grouped, write_split

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = (REPO / ".." / "shared" / "data" / "cxr").resolve()


# Fixtures that hand out the real data folder (and skip without it): tests/conftest.py `data_dir`,
# tests/data/conftest.py `cxr_dir`. Every test using one, directly or through another fixture, is marked
# real_data.
REAL_DATA_FIXTURES = frozenset({"data_dir", "cxr_dir"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_DATA_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_data)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data/cxr (skips when absent)."""
    if not (DATA_DIR / "manifest.csv").is_file():
        pytest.skip(f"real data not found at {DATA_DIR}")
    return DATA_DIR


def read_real_manifest(data_dir: Path) -> pd.DataFrame:
    """The real manifest as strings (paths relative to data_dir)."""
    return pd.read_csv(data_dir / "manifest.csv", dtype=str, keep_default_na=False)


def write_real_subset(data_dir: Path, rows: pd.DataFrame, root: Path, *, test_frac: float, val_frac: float,
                      link_annotations: bool = False) -> tuple[Path, Path]:
    """Write rows of the real manifest as root/manifest.csv with absolute image paths (the images stay
    where they are) and a grouped split (seed 0) as root/split.csv; returns (root, split_csv).
    link_annotations links root/annotations to the real folder."""
    sub = rows.drop_duplicates("image").reset_index(drop=True)
    sub["image"] = [str(data_dir / p) for p in sub["image"]]
    root.mkdir(parents=True, exist_ok=True)
    sub.to_csv(root / "manifest.csv", index=False)
    if link_annotations:
        (root / "annotations").symlink_to(data_dir / "annotations")
    split = write_split(split_grouped(sub, seed=0, test_frac=test_frac, val_frac=val_frac), root / "split.csv")
    return root, Path(split)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (use with pytest.mark.usefixtures: a model may be training
    beside the tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
