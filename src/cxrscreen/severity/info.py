"""What a model folder's severity regressor is, read from its severity.json without loading it: a module of its
own (json only) so that the server's `/api/model` imports no torch with the ONNX Runtime engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "severity.json"


def severity_info(folder: str | Path) -> dict[str, Any] | None:
    """What a model folder's severity.json says (features, penalties, cross-validated figures), or None
    when it ships no regressor (what `/api/model` shows)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    keys = ("targets", "ranges", "regressor", "features", "alphas", "candidate", "cv", "reference", "data")
    return {k: cfg.get(k) for k in keys}
