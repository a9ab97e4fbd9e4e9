"""The preprocessed-image cache: each file decoded and preprocessed once per preprocessing config, keyed
by the file's content hash; loading a list of files into memory with per-file errors kept."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha1
from cxrscreen.io.xray import read_xray
from cxrscreen.transforms.preprocess import PreprocessConfig, Preprocessor


def default_cache_dir() -> Path:
    """$CXRSCREEN_CACHE, else $XDG_CACHE_HOME/cxrscreen, else ~/.cache/cxrscreen."""
    if env := os.environ.get("CXRSCREEN_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cxrscreen"


class PreprocessedCache:
    """Returns the preprocessed uint8 image of a file, decoding only on a cache miss.

    cache_dir=None disables the disk cache (every call decodes).
    """

    def __init__(self, config: PreprocessConfig, cache_dir: Path | None = None) -> None:
        self.config = config
        self.preprocess = Preprocessor(config)
        self.dir = None if cache_dir is None else Path(cache_dir) / config.cache_key()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def get(self, path: Path) -> np.ndarray:
        path = Path(path)
        if self.dir is None:
            self.misses += 1
            return self.preprocess(read_xray(path).pixels)[0]
        key = file_sha1(path)  # CXRError naming the file when it cannot be read
        file = self.dir / f"{key}.npy"
        if file.exists():
            try:
                arr = np.load(file)
                self.hits += 1
                return arr
            except (OSError, ValueError):
                file.unlink(missing_ok=True)  # a torn cache file is rebuilt, never trusted
        self.misses += 1
        img = self.preprocess(read_xray(path).pixels)[0]
        tmp = file.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, img)
        os.replace(tmp, file)
        return img


@dataclass
class LoadedImages:
    """Images held in memory: uint8 (N, S, S), and the files that failed with their errors."""

    images: np.ndarray
    kept: list[int]
    errors: dict[str, str] = field(default_factory=dict)


def load_images(
    paths: Sequence[Path],
    cache: PreprocessedCache,
    *,
    progress: Callable[[int], None] | None = None,
) -> LoadedImages:
    """Preprocess every file (through the cache); a bad file is recorded and skipped, never fatal."""
    size = cache.config.image_size
    out = np.zeros((len(paths), size, size), dtype=np.uint8)
    kept: list[int] = []
    errors: dict[str, str] = {}
    for i, p in enumerate(paths):
        try:
            out[len(kept)] = cache.get(Path(p))
            kept.append(i)
        except CXRError as exc:
            errors[str(p)] = exc.problem
        if progress is not None:
            progress(1)
    return LoadedImages(images=out[: len(kept)], kept=kept, errors=errors)

