"""What every source adapter returns, and helpers they share."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cxrscreen.data.manifest import LABELS, REQUIRED_COLUMNS


@dataclass
class SourceRecords:
    """One source's images in manifest form.

    ``records``: the manifest columns (``image`` an ABSOLUTE path) plus any extra columns, all ``str``.
    ``summary``: ``{"kind", "path", "kept": {label: n}, "dropped": {reason: n}, ...}`` (JSON-able).
    """

    records: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def abs_path(path: str | Path) -> Path:
    """Absolute, normalised path (``..`` folded, symlinks NOT followed)."""
    return Path(os.path.abspath(path))


def make_records(rows: list[dict[str, str]], extra_columns: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows (dicts) -> DataFrame with the required columns, then ``extra_columns``, all ``str``."""
    cols = list(REQUIRED_COLUMNS) + [c for c in extra_columns if c not in REQUIRED_COLUMNS]
    df = pd.DataFrame(rows, columns=cols)
    return df.fillna("").astype(str)


def make_summary(
    kind: str, path: Path, records: pd.DataFrame, dropped: Counter[str], **extra: Any
) -> dict[str, Any]:
    """Summary dict: counts kept per label (all labels listed), dropped per reason, plus ``extra``."""
    counts = records["label"].value_counts() if len(records) else pd.Series(dtype=int)
    kept = {lab: int(counts.get(lab, 0)) for lab in LABELS}
    return {
        "kind": kind,
        "path": str(abs_path(path)),
        "n_kept": int(len(records)),
        "kept": kept,
        "n_dropped": int(sum(dropped.values())),
        "dropped": dict(sorted(dropped.items())),
        **extra,
    }


# At most this many example paths of missing files are listed in a summary.
MAX_LISTED = 20
