"""A small synthetic manifest + split for the training tests that must not need ../shared."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from tests.conftest import synthetic_cxr

LESION = {"covid": (90, 60), "pneumonia": (170, 190), "normal": None}


def write_synthetic_dataset(root: Path, per_class: int = 16, size: int = 96) -> tuple[Path, Path]:
    """root/manifest.csv (per_class images of each class, the lesion's place gives the class, two sources)
    and root/split.csv (3/4 train, 1/4 val, by patient). Returns (root, split_csv)."""
    root.mkdir(parents=True, exist_ok=True)
    rows, split = [], []
    for c, (label, lesion) in enumerate(LESION.items()):
        for i in range(per_class):
            name = f"images/{label}_{i:03d}.png"
            scaled = None if lesion is None else (lesion[0] * size // 256, lesion[1] * size // 256)
            img = synthetic_cxr(size, size, lesion=scaled, seed=100 * c + i)
            (root / "images").mkdir(exist_ok=True)
            cv2.imwrite(str(root / name), (img * 255).astype(np.uint8))
            pid = f"{label}-{i}"
            rows.append({"image": name, "label": label, "source": f"s{i % 2}", "patient_id": pid,
                         "split_group": pid})
            split.append({"image": name, "subset": "val" if i % 4 == 0 else "train"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    pd.DataFrame(split).to_csv(root / "split.csv", index=False)
    return root, root / "split.csv"
