"""files: file digests and atomic JSON writes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from cxrscreen.errors import CXRError

_CHUNK = 1 << 20


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    """Hex digest (any ``hashlib`` algorithm) of a file's bytes, read in chunks; CXRError naming the file
    when it cannot be read."""
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
    return file_digest(path, "sha256")


def file_sha1(path: str | Path) -> str:
    """Hex sha1 of a file's bytes (the content hash used to find duplicate images and key the cache)."""
    return file_digest(path, "sha1")


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (``default=str`` for paths and the like) atomically: to a temporary file in
    the same folder, then ``os.replace``, so a reader never sees a torn file. Returns the path."""
    path = Path(path)
    text = json.dumps(obj, indent=indent, default=str)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
