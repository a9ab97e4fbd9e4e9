"""Read, validate and write image manifests (one row per image), and hash files.

A manifest is a folder holding ``manifest.csv`` with at least the columns in :data:`REQUIRED_COLUMNS`.
``image`` is a path relative to that folder (an absolute path is allowed too); ``label`` is one of
:data:`LABELS`; ``split_group`` ties images that must never be split apart (same patient, same picture).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from cxrscreen import CLASSES
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha256

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS: tuple[str, ...] = ("image", "label", "source", "patient_id", "split_group")
LABELS: tuple[str, ...] = CLASSES
# Columns that may not be empty in any row (patient_id may: some sources give none).
NON_EMPTY_COLUMNS: tuple[str, ...] = ("image", "label", "source", "split_group")


def manifest_csv(path: str | Path) -> Path:
    """Path of the csv itself: ``path/manifest.csv`` for a folder, ``path`` for a file."""
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def manifest_root(path: str | Path) -> Path:
    """Folder that the manifest's relative ``image`` paths start from (the csv's folder)."""
    return manifest_csv(path).parent


def read_csv_strings(path: str | Path) -> pd.DataFrame:
    """Read any csv with every column as ``str`` and empty cells as ``""``; CXRError if unreadable."""
    p = Path(path)
    if not p.is_file():
        raise CXRError("file not found", p)
    try:
        return pd.read_csv(p, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CXRError(f"not a readable csv file ({exc})", p) from exc


def check_columns(df: pd.DataFrame, required: Iterable[str], path: str | Path | None) -> None:
    """Raise CXRError naming ``path`` and the first column of ``required`` that ``df`` lacks."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CXRError(
            f"missing column {missing[0]!r} "
            f"(required: {', '.join(required)}; found: {', '.join(map(str, df.columns))})",
            path,
        )


def validate_manifest(df: pd.DataFrame, path: str | Path | None = None) -> None:
    """Check required columns, non-empty cells and labels; CXRError names ``path``, the row and value.

    Rows are numbered from 1 for the first data row (the line after the header).
    """
    check_columns(df, REQUIRED_COLUMNS, path)
    for col in NON_EMPTY_COLUMNS:
        empty = (df[col].astype(str).str.strip() == "").to_numpy()
        if empty.any():
            row = int(empty.argmax()) + 1
            raise CXRError(f"empty {col!r} in row {row} (rows counted from 1 after the header)", path)
    bad = (~df["label"].isin(LABELS)).to_numpy()
    if bad.any():
        i = int(bad.argmax())
        raise CXRError(
            f"bad label {df['label'].iloc[i]!r} in row {i + 1} (rows counted from 1 after the header); "
            f"labels must be one of {', '.join(LABELS)}",
            path,
        )


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest.

    Input: a manifest folder (holding ``manifest.csv``) or the csv file itself.
    Output: the rows as a DataFrame, every column ``str`` (empty cells ``""``), columns as in the file
    (none added; numeric columns are left for callers to parse). Raises CXRError naming the file.
    """
    csv = manifest_csv(path)
    df = read_csv_strings(csv)
    validate_manifest(df, csv)
    return df


def resolve_image_paths(df: pd.DataFrame, root: str | Path) -> list[Path]:
    """Absolute-or-joined image paths: ``root / image`` per row, an absolute ``image`` kept as is."""
    base = Path(root)
    return [base / img for img in df["image"].astype(str)]


def write_manifest(df: pd.DataFrame, out_dir: str | Path) -> Path:
    """Validate ``df`` and write ``out_dir/manifest.csv`` (required columns first); return the csv path."""
    out = Path(out_dir)
    csv = out / MANIFEST_NAME
    validate_manifest(df, csv)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(REQUIRED_COLUMNS) + [c for c in df.columns if c not in REQUIRED_COLUMNS]
    df[cols].to_csv(csv, index=False)
    return csv


def manifest_hash(path: str | Path) -> str:
    """Hex sha256 of the manifest csv's bytes (``path`` is the folder or the csv)."""
    return file_sha256(manifest_csv(path))


def split_hash(path: str | Path) -> str:
    """Hex sha256 of a split csv's bytes."""
    return file_sha256(path)

