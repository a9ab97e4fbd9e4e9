"""The test probabilities file each comparison run writes (path, label, p per class) and its reader."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd


def write_test_probs(path: Path, paths: list[str], labels: np.ndarray, groups: list[str], sources: list[str],
                     probs: np.ndarray, classes: list[str]) -> Path:
    """CSV image, label, split_group, source, p_<class>... (probabilities at full precision)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "split_group", "source", *[f"p_{c}" for c in classes]])
        for i, p in enumerate(paths):
            w.writerow([p, classes[int(labels[i])], groups[i], sources[i], *[repr(float(v)) for v in probs[i]]])
    return path


def read_test_probs(path: Path) -> pd.DataFrame:
    """The per-image probabilities written by `write_test_probs`."""
    return pd.read_csv(path, dtype={"image": str, "label": str, "split_group": str, "source": str},
                       keep_default_na=False)

