"""The severity scores of Cohen et al. (``annotations/severity_scores.csv``) matched to manifest rows.

The file starts with comment lines (``## ...``), then ``image, geographic_extent_mean, opacity_mean``;
``image`` is the manifest's ``image`` path. Each score is the mean of three radiologists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrscreen.data.manifest import manifest_root, read_manifest, resolve_image_paths
from cxrscreen.errors import CXRError

SCORES_FILE = "annotations/severity_scores.csv"
TARGETS: tuple[str, ...] = ("geographic_extent", "opacity")
"""The two scores, in the column order of every (N, 2) array in this package."""
TARGET_RANGES: dict[str, tuple[float, float]] = {"geographic_extent": (0.0, 8.0), "opacity": (0.0, 6.0)}
_COLUMNS = {"geographic_extent": "geographic_extent_mean", "opacity": "opacity_mean"}


@dataclass
class SeveritySet:
    """The scored images: manifest image paths, absolute file paths, split groups and targets (N, 2)."""

    images: list[str]
    paths: list[Path]
    groups: list[str]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def read_scores(path: str | Path) -> pd.DataFrame:
    """The scores file as a frame ``image, geographic_extent, opacity``; CXRError if unusable."""
    try:
        df = pd.read_csv(path, comment="#", dtype={"image": str})
    except (OSError, ValueError) as exc:
        raise CXRError(f"not a readable severity scores file ({exc})", path) from exc
    missing = [c for c in ("image", *_COLUMNS.values()) if c not in df.columns]
    if missing:
        raise CXRError(f"severity scores lack column {missing[0]!r}", path)
    out = pd.DataFrame({"image": df["image"]})
    for t, c in _COLUMNS.items():
        out[t] = pd.to_numeric(df[c], errors="coerce")
        lo, hi = TARGET_RANGES[t]
        bad = out[t].isna() | (out[t] < lo) | (out[t] > hi)
        if bad.any():
            raise CXRError(f"{c} of {out['image'][bad].iloc[0]!r} is not a number in [{lo:g}, {hi:g}]", path)
    if out["image"].duplicated().any():
        raise CXRError(f"image {out['image'][out['image'].duplicated()].iloc[0]!r} is scored twice", path)
    return out


def load_severity_set(data_dir: str | Path, scores: str | Path | None = None) -> SeveritySet:
    """Scored images of a manifest folder with their split_group; CXRError if a scored image is not in
    the manifest (a score without its group could leak across folds)."""
    root = manifest_root(data_dir)
    table = read_scores(scores if scores is not None else root / SCORES_FILE)
    df = read_manifest(data_dir)
    paths = resolve_image_paths(df, root)
    row_of = {str(im): i for i, im in enumerate(df["image"])}
    missing = [im for im in table["image"] if im not in row_of]
    if missing:
        raise CXRError(f"{len(missing)} scored image(s) are not in the manifest, e.g. {missing[0]!r}", data_dir)
    rows = [row_of[im] for im in table["image"]]
    return SeveritySet(
        images=list(table["image"]),
        paths=[Path(paths[i]) for i in rows],
        groups=[str(df["split_group"].iloc[i]) for i in rows],
        targets=table[list(TARGETS)].to_numpy(np.float64),
    )
