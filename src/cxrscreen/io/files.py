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


def read_checked_bundle(folder: Path, config_name: str, weights_name: str, what: str, *,
                        require_checksum: bool = True) -> tuple[dict[str, Any], Path]:
    """(the parsed `config_name` JSON, the path of `weights_name`) of a model folder, the weights checked against
    the config's ``weights_sha256``. `what` names the model in errors ("lung segmentation model"). CXRError when a
    file is missing, the JSON is broken, the checksum is not recorded (when required) or differs."""
    cpath, wpath = folder / config_name, folder / weights_name
    if not (cpath.is_file() and wpath.is_file()):
        raise CXRError(f"no {what} ({config_name} and {weights_name}) in this folder", folder)
    try:
        config = json.loads(cpath.read_text())
    except json.JSONDecodeError as exc:
        raise CXRError(f"{config_name} is not valid JSON ({exc})", cpath) from exc
    want = config.get("weights_sha256")
    if not want and require_checksum:
        raise CXRError(f"{config_name} records no weights_sha256", cpath)
    if want and file_sha256(wpath) != want:
        raise CXRError(f"{what}: weights checksum mismatch; the file is corrupt or was replaced", wpath)
    return config, wpath
