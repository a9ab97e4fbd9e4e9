"""Adapter for a plain folder of images sorted into one sub-folder per class.

Layout: ``<root>/<class>/**/*.{png,jpg,jpeg,dcm}`` with ``<class>`` one of covid / normal / pneumonia
(matched ignoring case). Other sub-folders and files elsewhere are ignored and listed in the summary.
Source = the root folder's name; no patient ids, so every file is its own split group ``img:<sha1>``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cxrscreen.data.manifest import LABELS
from cxrscreen.data.sources.base import SourceRecords, abs_path, make_records, make_summary
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha1

KIND = "folder"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm"})


def load(path: Path) -> SourceRecords:
    """Load every image under ``path/<class>/`` as manifest rows, sorted by class then path.

    Output rows: image (absolute), label (the class folder), source (the root's name), patient_id empty,
    split_group ``img:<sha1 of the file>``. Summary adds ``ignored_folders`` and ``ignored_files``
    (non-image files under class folders, or any file directly under the root).
    """
    root = abs_path(path)
    if not root.is_dir():
        raise CXRError("not a folder", root)
    source = root.name
    class_dirs: dict[str, list[Path]] = {lab: [] for lab in LABELS}
    ignored_folders: list[str] = []
    ignored_files = 0
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir() and child.name.lower() in class_dirs:
            class_dirs[child.name.lower()].append(child)
        elif child.is_dir():
            ignored_folders.append(child.name)
        else:
            ignored_files += 1
    if not any(class_dirs.values()):
        raise CXRError(f"no class sub-folder ({', '.join(LABELS)}) in this folder", root)
    rows: list[dict[str, str]] = []
    for label, dirs in class_dirs.items():
        for d in dirs:
            for f in sorted(d.rglob("*")):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(d).parts):
                    continue
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    ignored_files += 1
                    continue
                rows.append(
                    {
                        "image": str(f),
                        "label": label,
                        "source": source,
                        "patient_id": "",
                        "split_group": f"img:{file_sha1(f)}",
                    }
                )
    records = make_records(rows)
    summary = make_summary(
        KIND, root, records, Counter(), ignored_folders=ignored_folders, ignored_files=ignored_files
    )
    return SourceRecords(records, summary)
