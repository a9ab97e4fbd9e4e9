"""Cached pooled features of a frozen feature-head backbone, so heads, penalties and data mixes compare in minutes.

Features are computed once per (preprocessed image, recipe) and kept on disk: the key of a recipe is the hash of
the architecture, the preprocessing (the lungs mode's margin only in that mode) and the flip option; the key of an
image is the sha1 of its preprocessed uint8 pixels. What is cached is the global average of **every** stage the
backbone offers (so which stages a head reads is free to change); `select_stages` picks the chosen ones' columns,
in the order the model concatenates them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrscreen.errors import CXRError
from cxrscreen.models.feature_head import FeatureHeadNet, stage_names
from cxrscreen.transforms.cache import default_cache_dir
from cxrscreen.transforms.preprocess import PreprocessConfig, to_model_array

CACHE_VERSION = 1


class FeatureCache:
    """Pooled features of every stage of `arch`'s frozen ImageNet backbone for preprocessed images.

    Args:
        arch: a registered feature-head architecture ("lite0_features", ...).
        preprocess: the preprocessing the images went through (its normalisation is applied here).
        flip: average with the mirrored image's features. These are the unflipped recipe's features of the image
            and of its mirror image (kept in the unflipped recipe's folder, the mirror image under its own pixel
            hash), so a flip recipe costs one pass more than an unflipped one that is already cached.
        cache_dir: root of the cache (default: `default_cache_dir()` / "features"); None disables the disk.
        batch_size: images per forward pass (8 runs faster on a 2-core CPU than 32: see
            `tasks.classification.CPU_FORWARD_CHUNK`).
    """

    def __init__(self, arch: str, preprocess: PreprocessConfig, *, flip: bool = False,
                 cache_dir: Path | None | str = "default", batch_size: int = 8) -> None:
        from cxrscreen.models.registry import create_model

        self.arch, self.preprocess, self.flip, self.batch_size = arch, preprocess, bool(flip), batch_size
        self._model: FeatureHeadNet | None = None
        self._create = lambda: create_model(arch, num_classes=1, in_chans=1, weights="imagenet",
                                            options={"stages": list(self.all_stages), "flip": self.flip})
        self.all_stages, self.dims = _stage_layout(arch)
        recipe = {"v": CACHE_VERSION, "arch": arch, "preprocess": _key_fields(preprocess), "flip": self.flip}
        self.key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
        root = default_cache_dir() / "features" if cache_dir == "default" else cache_dir
        self._unflipped = FeatureCache(arch, preprocess, cache_dir=cache_dir, batch_size=batch_size) if flip else None
        self.dir = None if root is None else Path(root) / self.key
        if self._unflipped is not None:
            self.dir = self._unflipped.dir
        elif self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @property
    def model(self) -> FeatureHeadNet:
        if self._model is None:  # channels-last: the depthwise convolutions run faster on the CPU
            self._model = self._create().eval().to(memory_format=torch.channels_last)
        return self._model

    def features(self, images: np.ndarray | Sequence[np.ndarray],
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        """float32 (N, D_all) pooled features of every stage for preprocessed uint8 images (N, S, S)."""
        if self._unflipped is not None:
            base = self._unflipped
            mirrored = [np.ascontiguousarray(np.asarray(im)[:, ::-1]) for im in images]
            f = (base.features(images) + base.features(mirrored, progress)) / 2
            self.hits, self.misses = base.hits, base.misses
            return f
        n = len(images)
        width = sum(self.dims.values())
        out = np.zeros((n, width), np.float32)
        keys = [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]
        todo = []
        for i, k in enumerate(keys):
            got = self._read(k)
            if got is not None and got.shape == (width,):
                out[i] = got
                self.hits += 1
                if progress is not None:
                    progress(1)
            else:
                todo.append(i)
        for s in range(0, len(todo), self.batch_size):
            idx = todo[s : s + self.batch_size]
            x = torch.from_numpy(to_model_array([images[i] for i in idx], self.preprocess))
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                f = self.model.pooled(x).float().numpy()
            for j, i in enumerate(idx):
                out[i] = f[j]
                self._write(keys[i], f[j])
            self.misses += len(idx)
            if progress is not None:
                progress(len(idx))
        return out

    def select_stages(self, feats: np.ndarray, stages: Sequence[str]) -> np.ndarray:
        """The columns of `stages` (in that order) from features of every stage (N, D_all)."""
        return select_stages(feats, self.all_stages, self.dims, stages)

    def _read(self, key: str) -> np.ndarray | None:
        if self.dir is None:
            return None
        path = self.dir / f"{key}.npy"
        if not path.exists():
            return None
        try:
            return np.load(path)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a torn file is recomputed, never trusted
            return None

    def _write(self, key: str, vec: np.ndarray) -> None:
        if self.dir is None:
            return
        path = self.dir / f"{key}.npy"
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, vec.astype(np.float32))
        os.replace(tmp, path)


def _key_fields(preprocess: PreprocessConfig) -> dict[str, Any]:
    """The preprocessing fields that change the features: all of them (the normalisation too), except the lungs
    mode's margin outside that mode, so that the crop and pad keys stay those of the caches written before the
    margin existed (as `PreprocessConfig.cache_key` keeps the preprocessed images' keys)."""
    d = preprocess.to_dict()
    if preprocess.resize_mode != "lungs":
        d.pop("lung_margin", None)
    return d


def _stage_layout(arch: str) -> tuple[tuple[str, ...], dict[str, int]]:
    """Every stage of `arch`'s backbone and its channel count (from a randomly initialised copy: no weights read)."""
    from cxrscreen.models.registry import create_model, get_spec

    if get_spec(arch).library != "feature_head":
        raise CXRError(f"{arch} is not a feature-head architecture (see `cxrscreen models`)")
    net = create_model(arch, num_classes=1, in_chans=1, weights=None)
    names = stage_names(len(net.backbone.blocks))
    return names, {s: net.all_dims[s] for s in names}


def select_stages(feats: np.ndarray, all_stages: Sequence[str], dims: dict[str, int],
                  stages: Sequence[str]) -> np.ndarray:
    """Columns of `stages` (in that order) out of features laid out as `all_stages` with widths `dims`."""
    offsets: dict[str, tuple[int, int]] = {}
    at = 0
    for s in all_stages:
        offsets[s] = (at, at + dims[s])
        at += dims[s]
    missing = [s for s in stages if s not in offsets]
    if missing:
        raise CXRError(f"no stage {missing[0]!r} in the cached features (stages: {', '.join(all_stages)})")
    return np.concatenate([feats[:, slice(*offsets[s])] for s in stages], axis=1)


def cache_summary(cache: FeatureCache) -> dict[str, Any]:
    """What a report records of the cache: its key, folder and hit/miss counts (of passes: a flip recipe looks
    up each image and its mirror image)."""
    return {"key": cache.key, "dir": None if cache.dir is None else str(cache.dir), "hits": cache.hits,
            "misses": cache.misses}
