"""Adapter for the COVID-19 image data collection (Cohen et al.) in its native layout.

Input: the collection folder (holding ``metadata.csv``) or a metadata csv file directly. Each row's
image is looked for, first hit wins, at

1. ``<csv folder>/<folder>/<filename>``   (the collection's own layout: ``metadata.csv`` beside ``images/``)
2. ``<csv folder>/../<folder>/<filename>`` (e.g. ``cxr/annotations/cohen_metadata.csv`` with
   ``folder = images/cohen`` -> ``cxr/images/cohen/<filename>``)

(``folder`` defaults to ``images`` when the column is absent or empty). Rows whose image is found in
neither place are dropped and counted as ``missing_image``.

Kept: modality X-ray, frontal views (PA, AP, AP Supine, AP Erect). Findings are mapped by
:func:`map_finding`; everything dropped is counted per reason in the summary.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from cxrscreen.data.manifest import check_columns, read_csv_strings
from cxrscreen.data.sources.base import MAX_LISTED, SourceRecords, abs_path, make_records, make_summary
from cxrscreen.errors import CXRError

KIND = "cohen"
METADATA_NAME = "metadata.csv"
REQUIRED = ("patientid", "finding", "view", "modality", "filename")
EXTRA_COLUMNS = ("view", "sex", "age", "original_label", "license")

FRONTAL_VIEWS = frozenset({"pa", "ap", "ap supine", "ap erect"})
LATERAL_VIEWS = frozenset({"l", "lateral", "ll", "rl"})
XRAY_MODALITIES = frozenset({"x-ray", "xray", "cr", "dx"})
UNKNOWN_FINDINGS = frozenset({"", "todo", "unknown"})
# Findings of the flat (2020) metadata that name a cause of pneumonia without the word "pneumonia";
# the hierarchical form ("Pneumonia/Bacterial/Klebsiella") is caught by the word itself.
PNEUMONIA_CAUSES = frozenset(
    {
        "sars", "mers", "mers-cov", "pneumocystis", "streptococcus", "staphylococcus", "klebsiella",
        "legionella", "e.coli", "chlamydophila", "mycoplasma", "varicella", "influenza", "bacterial",
        "viral", "fungal", "aspergillosis", "nocardia", "lipoid", "herpes",
    }
)  # fmt: skip
_COVID = re.compile(r"covid|sars-cov-2", re.IGNORECASE)

# Drop reasons (summary["dropped"] keys).
NOT_XRAY = "not_xray"
LATERAL_VIEW = "lateral_view"
OTHER_VIEW = "other_view"
UNKNOWN_FINDING = "unknown_finding"
NOT_PNEUMONIA = "not_pneumonia_finding"
MISSING_IMAGE = "missing_image"


def map_finding(finding: str) -> tuple[str | None, str | None]:
    """Raw finding -> ``(label, None)`` or ``(None, drop reason)``.

    COVID-19 anywhere (``COVID-19``, ``COVID-19, ARDS``, ``Pneumonia/Viral/COVID-19``) -> covid;
    ``No Finding`` -> normal; any other finding with the word pneumonia or naming a pneumonia cause
    (``SARS``, ``Streptococcus``, ``Pneumonia/Fungal/Pneumocystis``...) -> pneumonia; ``todo``,
    ``Unknown`` or empty -> dropped as unknown; anything else (``Tuberculosis``, ``ARDS``...) -> dropped.
    """
    text = " ".join(finding.split())
    low = text.lower()
    if low in UNKNOWN_FINDINGS:
        return None, UNKNOWN_FINDING
    if _COVID.search(text):
        return "covid", None
    if low == "no finding":
        return "normal", None
    if "pneumonia" in low:
        return "pneumonia", None
    tokens = {t.strip() for t in re.split(r"[,/;]", low)}
    if tokens & PNEUMONIA_CAUSES:
        return "pneumonia", None
    return None, NOT_PNEUMONIA


def _view_reason(view: str) -> str | None:
    """None for a kept (frontal) view, else the drop reason."""
    low = " ".join(view.split()).lower()
    if low in FRONTAL_VIEWS:
        return None
    return LATERAL_VIEW if low in LATERAL_VIEWS else OTHER_VIEW


def _find_image(csv_dir: Path, folder: str, filename: str) -> Path | None:
    for base in (csv_dir, csv_dir.parent):
        candidate = base / folder / filename
        if candidate.is_file():
            return abs_path(candidate)
    return None


def load(path: Path) -> SourceRecords:
    """Load the collection at ``path`` (folder with ``metadata.csv``, or a metadata csv) as manifest rows.

    Output rows: label, source ``cohen``, patient_id / split_group ``cohen:<patientid>``, view, sex, age,
    original_label (the raw finding), license; summary counts kept per label and dropped per reason
    (plus ``dropped_findings``: raw finding -> count for rows dropped for their finding).
    """
    path = Path(path)
    csv = path / METADATA_NAME if path.is_dir() else path
    if not csv.is_file():
        raise CXRError(f"no Cohen metadata here (expected a folder holding {METADATA_NAME}, or a csv)", path)
    meta = read_csv_strings(csv)
    check_columns(meta, REQUIRED, csv)
    csv_dir = csv.parent
    dropped: Counter[str] = Counter()
    dropped_findings: Counter[str] = Counter()
    missing: list[str] = []
    rows: list[dict[str, str]] = []
    for rec in meta.to_dict("records"):
        if " ".join(rec["modality"].split()).lower() not in XRAY_MODALITIES:
            dropped[NOT_XRAY] += 1
            continue
        reason = _view_reason(rec["view"])
        if reason:
            dropped[reason] += 1
            continue
        label, reason = map_finding(rec["finding"])
        if label is None:
            dropped[str(reason)] += 1
            dropped_findings[rec["finding"]] += 1
            continue
        folder = rec.get("folder", "").strip() or "images"
        image = _find_image(csv_dir, folder, rec["filename"].strip())
        if image is None:
            dropped[MISSING_IMAGE] += 1
            missing.append(f"{folder}/{rec['filename']}")
            continue
        pid = rec["patientid"].strip()
        patient_id = f"{KIND}:{pid}" if pid else ""
        rows.append(
            {
                "image": str(image),
                "label": label,
                "source": KIND,
                "patient_id": patient_id,
                "split_group": patient_id or f"{KIND}:image:{rec['filename'].strip()}",
                "view": " ".join(rec["view"].split()),
                "sex": rec.get("sex", ""),
                "age": rec.get("age", ""),
                "original_label": rec["finding"],
                "license": rec.get("license", ""),
            }
        )
    records = make_records(rows, EXTRA_COLUMNS)
    summary = make_summary(
        KIND,
        csv,
        records,
        dropped,
        n_rows=int(len(meta)),
        dropped_findings=dict(sorted(dropped_findings.items())),
        missing_examples=missing[:MAX_LISTED],
    )
    return SourceRecords(records, summary)
