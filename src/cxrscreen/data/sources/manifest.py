"""Adapter for an existing manifest folder (such as ``../shared/data/cxr``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cxrscreen.data.manifest import manifest_csv, manifest_root, read_manifest, resolve_image_paths
from cxrscreen.data.sources.base import MAX_LISTED, SourceRecords, abs_path, make_summary

KIND = "manifest"


def load(path: Path) -> SourceRecords:
    """Load every row of a manifest (folder or csv), extra columns kept, ``image`` made absolute.

    Rows whose image file is missing are dropped and counted (``dropped["missing_image"]``).
    """
    csv = manifest_csv(path)
    df = read_manifest(csv)
    images = [abs_path(p) for p in resolve_image_paths(df, manifest_root(csv))]
    exists = [p.is_file() for p in images]
    df = df.assign(image=[str(p) for p in images])
    missing = [str(p) for p, ok in zip(images, exists, strict=True) if not ok]
    records = df[exists].reset_index(drop=True)
    dropped: Counter[str] = Counter({"missing_image": len(missing)} if missing else {})
    summary = make_summary(KIND, csv, records, dropped, missing_examples=missing[:MAX_LISTED])
    return SourceRecords(records, summary)
