"""Source adapters: Cohen (real csv and synthetic), RSNA (generated DICOM fixture), folder, manifest."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from cxrscreen.data.manifest import REQUIRED_COLUMNS
from cxrscreen.data.sources import ADAPTERS, SourceRecords
from cxrscreen.data.sources.cohen import map_finding
from cxrscreen.errors import CXRError
from cxrscreen.synthetic import write_dicom

FRONTAL = {"PA", "AP", "AP Supine", "AP Erect"}


def _check_records(result: SourceRecords) -> pd.DataFrame:
    df = result.records
    assert list(df.columns[:5]) == list(REQUIRED_COLUMNS)
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["image"])
    assert sum(result.summary["kept"].values()) == len(df)
    return df


# ------------------------------------------------------------------------------------------------ cohen
def test_cohen_real_metadata(cxr_dir: Path) -> None:
    result = ADAPTERS["cohen"](cxr_dir / "annotations" / "cohen_metadata.csv")
    df = _check_records(result)
    # Every row of this csv is a frontal X-ray with a usable finding; the counts match the README.
    assert result.summary["kept"] == {"covid": 329, "normal": 8, "pneumonia": 77}
    assert result.summary["dropped"] == {}
    assert set(df["view"]) <= FRONTAL
    assert (df["source"] == "cohen").all()
    assert df["patient_id"].str.startswith("cohen:").all()
    assert (df["split_group"] == df["patient_id"]).all()
    assert set(df.loc[df["label"] == "pneumonia", "original_label"]) >= {
        "SARS",
        "Pneumocystis",
        "Streptococcus",
    }
    assert set(df.loc[df["label"] == "covid", "original_label"]) == {"COVID-19", "COVID-19, ARDS"}
    # Resolved through <csv dir>/../images/cohen/<filename>.
    assert Path(df["image"].iloc[0]).resolve() == (cxr_dir / "images" / "cohen" / "000001-12.jpg").resolve()


@pytest.mark.parametrize(
    ("finding", "expected"),
    [
        ("COVID-19", ("covid", None)),
        ("COVID-19, ARDS", ("covid", None)),
        ("Pneumonia/Viral/COVID-19", ("covid", None)),
        ("No Finding", ("normal", None)),
        ("Pneumonia/Viral/SARS", ("pneumonia", None)),
        ("Pneumonia/Fungal/Pneumocystis", ("pneumonia", None)),
        ("Mycoplasma Bacterial Pneumonia", ("pneumonia", None)),
        ("E.Coli", ("pneumonia", None)),
        ("SARS", ("pneumonia", None)),
        ("todo", (None, "unknown_finding")),
        ("Unknown", (None, "unknown_finding")),
        ("Tuberculosis", (None, "not_pneumonia_finding")),
        ("Lung cancer", (None, "not_pneumonia_finding")),
        ("ARDS", (None, "not_pneumonia_finding")),
    ],
)
def test_cohen_finding_map(finding: str, expected: tuple[str | None, str | None]) -> None:
    assert map_finding(finding) == expected


COHEN_ROWS = [  # patientid, finding, view, modality, filename, expected label (None: dropped)
    ("1", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "a.png", "covid"),
    ("1", "COVID-19", "AP Supine", "X-ray", "b.png", "covid"),
    ("2", "No Finding", "AP", "X-ray", "c.png", "normal"),
    ("3", "Pneumonia/Bacterial/Streptococcus", "AP Erect", "X-ray", "d.png", "pneumonia"),
    ("4", "COVID-19", "Axial", "CT", "e.png", None),  # not_xray
    ("5", "COVID-19", "L", "X-ray", "f.png", None),  # lateral_view
    ("6", "todo", "PA", "X-ray", "g.png", None),  # unknown_finding
    ("7", "Tuberculosis", "PA", "X-ray", "h.png", None),  # not_pneumonia_finding
    ("8", "No Finding", "PA", "X-ray", "absent.png", None),  # missing_image
]


def _write_cohen(root: Path, png: Callable[[Path, int], Path], csv_dir: Path, folder: str) -> Path:
    """Collection layout: images at root/<folder>/<filename>, metadata csv in ``csv_dir``."""
    for i, row in enumerate(COHEN_ROWS):
        if row[4] != "absent.png":
            png(root / folder / row[4], i)
    csv_dir.mkdir(parents=True, exist_ok=True)
    path = csv_dir / "metadata.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        header = ["patientid", "offset", "sex", "age", "finding", "view", "modality", "folder", "filename"]
        w.writerow([*header, "license", ""])
        for pid, finding, view, modality, name, _ in COHEN_ROWS:
            w.writerow([pid, "", "F", "50", finding, view, modality, folder, name, "CC BY 4.0", ""])
    return path


def test_cohen_synthetic_mapping_and_drops(tmp_path: Path, png: Callable[[Path, int], Path]) -> None:
    root = tmp_path / "covid-chestxray-dataset"
    _write_cohen(root, png, root, "images")
    result = ADAPTERS["cohen"](root)  # the collection folder, metadata.csv inside
    df = _check_records(result)
    kept = [r for r in COHEN_ROWS if r[5]]
    assert [Path(p).name for p in df["image"]] == [r[4] for r in kept]
    assert df["label"].tolist() == [r[5] for r in kept]
    assert df["original_label"].tolist() == [r[1] for r in kept]
    assert df["patient_id"].tolist() == ["cohen:1", "cohen:1", "cohen:2", "cohen:3"]
    assert df["split_group"].tolist() == df["patient_id"].tolist()
    assert df["view"].tolist() == ["PA", "AP Supine", "AP", "AP Erect"]
    assert (df["license"] == "CC BY 4.0").all() and (df["sex"] == "F").all()
    assert result.summary["kept"] == {"covid": 2, "normal": 1, "pneumonia": 1}
    assert result.summary["dropped"] == {
        "lateral_view": 1,
        "missing_image": 1,
        "not_pneumonia_finding": 1,
        "not_xray": 1,
        "unknown_finding": 1,
    }
    assert result.summary["dropped_findings"] == {"Tuberculosis": 1, "todo": 1}
    assert result.summary["missing_examples"] == ["images/absent.png"]


def test_cohen_csv_in_sub_folder_resolves_through_parent(
    tmp_path: Path, png: Callable[[Path, int], Path]
) -> None:
    csv_path = _write_cohen(tmp_path, png, tmp_path / "annotations", "images/cohen")
    result = ADAPTERS["cohen"](csv_path)
    assert len(_check_records(result)) == 4
    assert Path(result.records["image"].iloc[0]) == tmp_path / "images" / "cohen" / "a.png"


def test_cohen_bad_input(tmp_path: Path) -> None:
    with pytest.raises(CXRError, match="no Cohen metadata"):
        ADAPTERS["cohen"](tmp_path)
    (tmp_path / "metadata.csv").write_text("patientid,finding\n1,COVID-19\n")
    with pytest.raises(CXRError, match="missing column 'view'"):
        ADAPTERS["cohen"](tmp_path)


# ------------------------------------------------------------------------------------------------- rsna
def rsna_dicom(path: Path, patient_id: str, view: str, seed: int) -> Path:
    """A small DICOM file (8-bit grey, 16 x 16, CR) with ViewPosition, sex and age, like RSNA's."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16), dtype=np.uint8)
    # PatientAge in DICOM AS form; the real RSNA files hold plain "51"
    return write_dicom(path, pixels, sop_class_uid=SecondaryCaptureImageStorage, Modality="CR", PatientID=patient_id,
                       PatientSex="M", PatientAge="051Y", ViewPosition=view)


def write_rsna(root: Path) -> Path:
    """RSNA stage-2 layout: one pneumonia patient with two boxes, one Normal, one Not Normal, one Normal
    whose DICOM is missing."""
    labels = [
        ("pneu-1", "264.0", "152.0", "213.0", "379.0", "1"),
        ("pneu-1", "562.0", "152.0", "256.0", "453.0", "1"),
        ("norm-1", "", "", "", "", "0"),
        ("notnorm-1", "", "", "", "", "0"),
        ("norm-missing", "", "", "", "", "0"),
    ]
    classes = [
        ("pneu-1", "Lung Opacity"),
        ("pneu-1", "Lung Opacity"),
        ("norm-1", "Normal"),
        ("notnorm-1", "No Lung Opacity / Not Normal"),
        ("norm-missing", "Normal"),
    ]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(labels, columns=["patientId", "x", "y", "width", "height", "Target"]).to_csv(
        root / "stage_2_train_labels.csv", index=False
    )
    pd.DataFrame(classes, columns=["patientId", "class"]).to_csv(
        root / "stage_2_detailed_class_info.csv", index=False
    )
    for i, (pid, view) in enumerate([("pneu-1", "AP"), ("norm-1", "PA"), ("notnorm-1", "PA")]):
        rsna_dicom(root / "stage_2_train_images" / f"{pid}.dcm", pid, view, i)
    return root


def test_rsna_fixture(tmp_path: Path) -> None:
    root = write_rsna(tmp_path / "rsna")
    assert pydicom.dcmread(root / "stage_2_train_images" / "norm-1.dcm").pixel_array.shape == (16, 16)
    result = ADAPTERS["rsna"](root)
    df = _check_records(result)
    assert df["patient_id"].tolist() == ["rsna:pneu-1", "rsna:norm-1"]
    assert df["split_group"].tolist() == df["patient_id"].tolist()
    assert df["label"].tolist() == ["pneumonia", "normal"]
    assert json.loads(df["boxes"].iloc[0]) == [[264, 152, 213, 379], [562, 152, 256, 453]]
    assert df["boxes"].iloc[1] == "[]"
    assert df["view"].tolist() == ["AP", "PA"]
    assert df["age"].tolist() == ["51", "51"]
    assert (df["source"] == "rsna").all()
    assert result.summary["kept"] == {"covid": 0, "normal": 1, "pneumonia": 1}
    assert result.summary["dropped"] == {"missing_image": 1, "not_normal_no_opacity": 1}
    # The labels csv itself is accepted too.
    assert ADAPTERS["rsna"](root / "stage_2_train_labels.csv").records.equals(df)


def test_rsna_not_a_challenge_folder(tmp_path: Path) -> None:
    with pytest.raises(CXRError, match="stage_2_train_labels.csv missing"):
        ADAPTERS["rsna"](tmp_path)


# ----------------------------------------------------------------------------------------------- folder
def test_folder_adapter(tmp_path: Path, png: Callable[[Path, int], Path]) -> None:
    root = tmp_path / "myset"
    png(root / "covid" / "a.png", 1)
    png(root / "covid" / "deeper" / "b.PNG", 2)
    png(root / "Normal" / "c.jpg", 3)
    png(root / "pneumonia" / "d.jpeg", 4)
    png(root / "other" / "e.png", 5)
    (root / "covid" / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("x")
    result = ADAPTERS["folder"](root)
    df = _check_records(result)
    assert [Path(p).name for p in df["image"]] == ["a.png", "b.PNG", "c.jpg", "d.jpeg"]
    assert df["label"].tolist() == ["covid", "covid", "normal", "pneumonia"]
    assert (df["source"] == "myset").all() and (df["patient_id"] == "").all()
    assert df["split_group"].str.match(r"^img:[0-9a-f]{40}$").all() and df["split_group"].is_unique
    assert result.summary["ignored_folders"] == ["other"]
    assert result.summary["ignored_files"] == 2
    with pytest.raises(CXRError, match="no class sub-folder"):
        ADAPTERS["folder"](root / "other")


# --------------------------------------------------------------------------------------------- manifest
def test_manifest_adapter_real(cxr_dir: Path) -> None:
    result = ADAPTERS["manifest"](cxr_dir)
    df = result.records
    assert len(df) == 2989 and result.summary["dropped"] == {}
    assert {"sha1", "original_label", "width"} <= set(df.columns)  # extra columns kept
    first = Path(df["image"].iloc[0])
    assert first.is_absolute() and first.is_file()
    assert set(ADAPTERS) == {"manifest", "cohen", "rsna", "folder"}
