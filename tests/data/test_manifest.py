"""Manifest reading, validation, writing and hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from cxrscreen.data.manifest import (
    LABELS,
    REQUIRED_COLUMNS,
    manifest_hash,
    manifest_root,
    read_manifest,
    resolve_image_paths,
    split_hash,
    write_manifest,
)
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha1, file_sha256


def _rows(n: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "extra": [f"x{i}" for i in range(n)],
            "image": [f"img/{i}.png" for i in range(n)],
            "label": [LABELS[i % 3] for i in range(n)],
            "source": ["s"] * n,
            "patient_id": [""] * n,
            "split_group": [f"g{i}" for i in range(n)],
            "age": ["007"] * n,
        }
    )


def test_real_manifest_reads_as_strings(cxr_dir: Path, real_manifest: pd.DataFrame) -> None:
    df = real_manifest
    assert len(df) == 2989
    assert list(df.columns[:5]) == list(REQUIRED_COLUMNS)
    header = (cxr_dir / "manifest.csv").read_text().splitlines()[0].split(",")
    assert list(df.columns) == header  # nothing added
    assert all(pd.api.types.is_string_dtype(dt) for dt in df.dtypes)
    assert df["label"].value_counts().to_dict() == {"normal": 1506, "covid": 964, "pneumonia": 519}
    assert read_manifest(cxr_dir / "manifest.csv").equals(df)
    assert manifest_root(cxr_dir / "manifest.csv") == cxr_dir == manifest_root(cxr_dir)
    paths = resolve_image_paths(df.head(3), manifest_root(cxr_dir))
    assert all(p.is_file() for p in paths)


def test_write_read_round_trip(tmp_path: Path) -> None:
    df = _rows()
    csv = write_manifest(df, tmp_path / "out")
    assert csv == tmp_path / "out" / "manifest.csv"
    back = read_manifest(tmp_path / "out")
    assert list(back.columns) == [*REQUIRED_COLUMNS, "extra", "age"]
    assert back["age"].tolist() == ["007"] * 3  # strings kept as written
    assert back["patient_id"].tolist() == [""] * 3  # empty stays "", not NaN
    assert manifest_hash(tmp_path / "out") == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert manifest_hash(csv) == file_sha256(csv) == split_hash(csv)
    assert file_sha1(csv) == hashlib.sha1(csv.read_bytes()).hexdigest()


def test_resolve_image_paths_relative_and_absolute(tmp_path: Path) -> None:
    df = _rows(2)
    df.loc[1, "image"] = str(tmp_path / "abs.png")
    assert resolve_image_paths(df, tmp_path / "root") == [
        tmp_path / "root" / "img/0.png",
        tmp_path / "abs.png",
    ]


def test_bad_label_names_file_row_and_value(tmp_path: Path) -> None:
    df = _rows()
    df.loc[1, "label"] = "Covid"
    df.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(CXRError) as err:
        read_manifest(tmp_path)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "manifest.csv") + ": ")
    assert "'Covid'" in msg and "row 2" in msg


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    _rows().drop(columns="split_group").to_csv(csv, index=False)
    with pytest.raises(CXRError, match="missing column 'split_group'") as err:
        read_manifest(csv)
    assert err.value.path == str(csv)


def test_empty_split_group_and_missing_file(tmp_path: Path) -> None:
    df = _rows()
    df.loc[2, "split_group"] = ""
    with pytest.raises(CXRError, match="empty 'split_group' in row 3"):
        write_manifest(df, tmp_path)
    assert not (tmp_path / "manifest.csv").exists()
    with pytest.raises(CXRError, match="file not found"):
        read_manifest(tmp_path / "nowhere")
