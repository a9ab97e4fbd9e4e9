"""Adapter for the RSNA Pneumonia Detection Challenge (stage 2) in its native layout.

Input: the challenge folder (or its ``stage_2_train_labels.csv``) holding

- ``stage_2_train_labels.csv``: ``patientId,x,y,width,height,Target``, one row per box (Target 1), or one
  row with empty box (Target 0);
- ``stage_2_detailed_class_info.csv``: ``patientId,class`` with class ``Lung Opacity``, ``Normal`` or
  ``No Lung Opacity / Not Normal`` (repeated per box);
- ``stage_2_train_images/<patientId>.dcm``.

One row per patient, in the order of the labels csv: Target 1 -> pneumonia with every box kept in ``boxes``
(JSON ``[[x, y, w, h], ...]`` in pixels of the DICOM); class Normal -> normal (``boxes`` ``[]``). Dropped and
counted: ``not_normal_no_opacity``, ``inconsistent_labels`` (Target and class disagree), ``no_class_info``,
``missing_image``, ``unreadable_dicom``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from cxrscreen.data.manifest import check_columns, read_csv_strings
from cxrscreen.data.sources.base import MAX_LISTED, SourceRecords, abs_path, make_records, make_summary
from cxrscreen.errors import CXRError

KIND = "rsna"
LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGES_DIR = "stage_2_train_images"
EXTRA_COLUMNS = ("view", "sex", "age", "original_label", "boxes")

CLASS_OPACITY = "Lung Opacity"
CLASS_NORMAL = "Normal"
CLASS_NOT_NORMAL = "No Lung Opacity / Not Normal"

NOT_NORMAL = "not_normal_no_opacity"
INCONSISTENT = "inconsistent_labels"
NO_CLASS = "no_class_info"
MISSING_IMAGE = "missing_image"
UNREADABLE = "unreadable_dicom"


def _number(text: str, where: Path) -> int | float:
    try:
        value = float(text)
    except ValueError as exc:
        raise CXRError(f"box coordinate {text!r} is not a number", where) from exc
    return int(value) if value.is_integer() else value


def _boxes(rows: pd.DataFrame, where: Path) -> list[list[int | float]]:
    """Boxes ``[x, y, w, h]`` of the Target-1 rows of one patient."""
    out = []
    for rec in rows[rows["Target"] == "1"].to_dict("records"):
        if all(rec[c].strip() for c in ("x", "y", "width", "height")):
            out.append([_number(rec[c], where) for c in ("x", "y", "width", "height")])
    return out


def _header(dcm: Path) -> dict[str, str]:
    """View, sex and age from the DICOM header (pixels not read); raises InvalidDicomError / OSError."""
    ds = pydicom.dcmread(
        dcm, stop_before_pixels=True, specific_tags=["ViewPosition", "PatientSex", "PatientAge"]
    )
    age = str(ds.get("PatientAge", "") or "").strip().rstrip("Yy")  # "51" or DICOM's "051Y"
    return {
        "view": str(ds.get("ViewPosition", "") or "").strip(),
        "sex": str(ds.get("PatientSex", "") or "").strip(),
        "age": str(int(age)) if age.isdigit() else age,
    }


def load(path: Path) -> SourceRecords:
    """Load the RSNA challenge at ``path`` as manifest rows (one per patient) and a summary.

    Output rows: label, source ``rsna``, patient_id / split_group ``rsna:<patientId>``, view / sex / age from
    the DICOM header, original_label (the detailed class), boxes (JSON).
    """
    path = Path(path)
    root = path if path.is_dir() else path.parent
    labels_csv, class_csv = root / LABELS_CSV, root / CLASS_CSV
    for needed in (labels_csv, class_csv):
        if not needed.is_file():
            raise CXRError(f"not an RSNA challenge folder: {needed.name} missing", root)
    labels = read_csv_strings(labels_csv)
    check_columns(labels, ("patientId", "x", "y", "width", "height", "Target"), labels_csv)
    bad = ~labels["Target"].isin(("0", "1"))
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise CXRError(f"Target {labels['Target'].iloc[i]!r} in row {i + 1} is not 0 or 1", labels_csv)
    classes = read_csv_strings(class_csv)
    check_columns(classes, ("patientId", "class"), class_csv)
    class_of = dict(zip(classes["patientId"], classes["class"], strict=True))

    dropped: Counter[str] = Counter()
    missing: list[str] = []
    rows: list[dict[str, str]] = []
    for pid, group in labels.groupby("patientId", sort=False):
        cls = class_of.get(pid)
        positive = bool((group["Target"] == "1").any())
        if cls is None:
            dropped[NO_CLASS] += 1
            continue
        if positive != (cls == CLASS_OPACITY):
            dropped[INCONSISTENT] += 1
            continue
        if cls == CLASS_NOT_NORMAL:
            dropped[NOT_NORMAL] += 1
            continue
        if not positive and cls != CLASS_NORMAL:
            dropped[INCONSISTENT] += 1
            continue
        dcm = root / IMAGES_DIR / f"{pid}.dcm"
        if not dcm.is_file():
            dropped[MISSING_IMAGE] += 1
            missing.append(str(dcm))
            continue
        try:
            header = _header(dcm)
        except (InvalidDicomError, OSError, ValueError):
            dropped[UNREADABLE] += 1
            continue
        rows.append(
            {
                "image": str(abs_path(dcm)),
                "label": "pneumonia" if positive else "normal",
                "source": KIND,
                "patient_id": f"{KIND}:{pid}",
                "split_group": f"{KIND}:{pid}",
                **header,
                "original_label": cls,
                "boxes": json.dumps(_boxes(group, labels_csv)),
            }
        )
    records = make_records(rows, EXTRA_COLUMNS)
    summary = make_summary(
        KIND,
        root,
        records,
        dropped,
        n_patients=int(labels["patientId"].nunique()),
        missing_examples=missing[:MAX_LISTED],
    )
    return SourceRecords(records, summary)
