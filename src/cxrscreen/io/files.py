"""files: moved from cxrscreen.data.manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cxrscreen.errors import CXRError

_CHUNK = 1 << 20


def _file_digest(path: str | Path, algo: str) -> str:
    h = hashlib.new(algo)
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise CXRError(f"cannot read file ({exc.strerror or exc})", path) from exc
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return _file_digest(path, "sha256")


def file_sha1(path: str | Path) -> str:
    """Hex sha1 of a file's bytes (the content hash used to find duplicate images)."""
    return _file_digest(path, "sha1")


def sha256_file(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

