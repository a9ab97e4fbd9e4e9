"""A split's subsets in memory (images, labels, groups, sources, paths) and the images an epoch draws."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler

from cxrscreen.data.manifest import manifest_root, read_manifest, resolve_image_paths
from cxrscreen.data.splits import read_split
from cxrscreen.errors import CXRError
from cxrscreen.transforms.cache import PreprocessedCache, load_images

if TYPE_CHECKING:
    from cxrscreen.training.config import TrainConfig


@dataclass
class SubsetData:
    """One subset's images in memory with labels, groups and sources, aligned."""

    images: np.ndarray
    labels: np.ndarray
    groups: list[str]
    sources: list[str]
    paths: list[str]
    errors: dict[str, str]


def load_subset(
    data_dir: Path,
    split_csv: Path | None,
    subset: str | None,
    cache: PreprocessedCache,
    classes: list[str],
    progress: Callable[[int], None] | None = None,
) -> SubsetData:
    """Images of one subset of a split (or all images of the manifest when split_csv is None)."""
    df = read_manifest(data_dir)
    if split_csv is not None:
        split = read_split(split_csv)
        unknown = set(split["image"]) - set(df["image"])
        if unknown:
            raise CXRError(f"{len(unknown)} split rows name images not in the manifest, e.g. {sorted(unknown)[0]}",
                           split_csv)
        keep = set(split.loc[split["subset"] == subset, "image"])
        df = df[df["image"].isin(keep)].reset_index(drop=True)
    paths = resolve_image_paths(df, manifest_root(data_dir))
    loaded = load_images(paths, cache, progress=progress)
    sub = df.iloc[loaded.kept].reset_index(drop=True)
    labels = np.array([classes.index(lbl) for lbl in sub["label"]], dtype=np.int64)
    return SubsetData(
        images=loaded.images,
        labels=labels,
        groups=list(sub["split_group"]),
        sources=list(sub["source"]),
        paths=[str(paths[i]) for i in loaded.kept],
        errors=loaded.errors,
    )


def load_train_val(
    data_dir: Path,
    split_csv: Path,
    cache: PreprocessedCache,
    classes: list[str],
    *,
    bar: Callable[[str, int], Any],
    log: Callable[[str], None],
) -> tuple[SubsetData, SubsetData]:
    """The train and val subsets of a split, with a progress bar each; unreadable files are logged and
    skipped. CXRError when no train image is left."""
    split_df = read_split(split_csv)
    subsets = {}
    for name in ("train", "val"):
        b = bar(f"loading {name} images", int((split_df["subset"] == name).sum()))
        subsets[name] = load_subset(data_dir, split_csv, name, cache, classes, b.update if b else None)
        if b:
            b.close()
        for p, e in subsets[name].errors.items():
            log(f"skipped {p}: {e}")
    if len(subsets["train"].labels) == 0:
        raise CXRError("the split has no usable train images", split_csv)
    return subsets["train"], subsets["val"]


def epoch_sampler(cfg: TrainConfig, labels: np.ndarray, n_classes: int, generator: torch.Generator) -> Sampler[int]:
    """The images one epoch draws: min(cfg.max_train_images_per_epoch, all) of them, classes drawn evenly
    (with replacement) when cfg.balance is "sampler", else a random order without replacement."""
    n = min(cfg.max_train_images_per_epoch or len(labels), len(labels))
    if cfg.balance == "sampler":
        w = 1.0 / np.bincount(labels, minlength=n_classes)[labels]
        return WeightedRandomSampler(w.tolist(), n, replacement=True, generator=generator)
    return RandomSampler(range(len(labels)), num_samples=n, generator=generator)
