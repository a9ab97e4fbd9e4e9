"""Checks of `cxrscreen predict`'s options, run before any model is loaded or any image read.

Each check raises :class:`~cxrscreen.errors.CXRError` with one line that names the option (and the path)
and the problem; the command line prints it and exits with status 2. Without them a bad option surfaced as
a traceback (FileExistsError, PermissionError, ValueError) after the model was loaded, or not at all
(``--argmax --threshold``: the threshold silently won).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cxrscreen.errors import CXRError


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the current folder for a relative name)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable_folder_under(path: Path, option: str) -> None:
    """CXRError unless the folders missing on the way to ``path`` can be created: the closest existing
    ancestor must be a writable folder."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise CXRError(f"{option}: {base} is a file, not a folder; cannot create {path}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise CXRError(f"{option}: the folder {base} is not writable (permission denied)")


def check_heatmap_folder(folder: Path) -> None:
    """--heatmap FOLDER: an existing writable folder, or one that can be created."""
    if folder.exists() and not folder.is_dir():
        raise CXRError(f"--heatmap: {folder} is an existing file; it takes a folder for the overlay PNGs")
    _check_creatable_folder_under(folder, "--heatmap")


def check_output_file(path: Path, *, resume: bool) -> None:
    """--out FILE: not a folder, in a folder that exists or can be created and is writable; an existing
    file only with --resume (and then readable and writable)."""
    if path.is_dir():
        raise CXRError(f"--out: {path} is a folder; it takes a .csv or .jsonl file")
    if path.exists():
        if not resume:
            raise CXRError(f"--out: {path} exists; pass --resume to continue it, or choose another --out")
        if not os.access(path, os.R_OK | os.W_OK):
            raise CXRError(f"--out: {path} is not readable and writable (permission denied)")
        return
    _check_creatable_folder_under(path.parent, "--out")


def check_predict_options(*, batch_size: int, argmax: bool, threshold: float | None, workers: int,
                          heatmap: Path | None, out_file: Path | None, resume: bool, shard: str | None) -> None:
    """Every option of `cxrscreen predict` that can be judged without the model; CXRError on the first
    bad one."""
    if batch_size < 1:
        raise CXRError(f"--batch-size must be 1 or more, not {batch_size}")
    if workers < 0:
        raise CXRError(f"--workers must be 0 or more, not {workers}")
    if argmax and threshold is not None:
        raise CXRError("--argmax and --threshold exclude each other (the threshold would decide); choose one")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise CXRError(f"--threshold is a probability between 0 and 1, not {threshold}")
    if shard is not None:
        from cxrscreen.predict.batch import Shard

        Shard.parse(shard)
    if heatmap is not None:
        check_heatmap_folder(heatmap)
    if out_file is not None:
        check_output_file(out_file, resume=resume)


def check_target(target: str | None, classes: Sequence[str]) -> None:
    """--target: one of the model's classes (checked once, before any image, not per image)."""
    if target is not None and target not in classes:
        raise CXRError(f"--target: unknown class {target!r}; this model's classes: {', '.join(classes)}")
