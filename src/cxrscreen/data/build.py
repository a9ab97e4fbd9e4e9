"""Build one manifest from several sources: run the adapters, drop duplicate files, link split groups.

Images are never copied: the written manifest points at them with paths relative to the output folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from cxrscreen.data.manifest import LABELS, MANIFEST_NAME, REQUIRED_COLUMNS, manifest_csv, write_manifest
from cxrscreen.data.sources import ADAPTERS
from cxrscreen.data.sources.base import abs_path
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha1

SUMMARY_NAME = "build_summary.json"


def parse_source_arg(arg: str) -> tuple[str, Path]:
    """``"KIND:PATH"`` -> ``(kind, Path(PATH))``; CXRError if malformed or the kind is unknown."""
    kind, sep, path = arg.partition(":")
    kind = kind.strip()
    if not sep or not path.strip():
        raise CXRError(f"source {arg!r} is not KIND:PATH (kinds: {', '.join(ADAPTERS)})")
    if kind not in ADAPTERS:
        raise CXRError(f"unknown source kind {kind!r} in {arg!r} (known: {', '.join(ADAPTERS)})")
    return kind, Path(path.strip()).expanduser()


class _Groups:
    """Union-find over split-group keys ``(input index, split_group)``."""

    def __init__(self) -> None:
        self.parent: dict[tuple[int, str], tuple[int, str]] = {}

    def find(self, key: tuple[int, str]) -> tuple[int, str]:
        self.parent.setdefault(key, key)
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:  # path compression
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, a: tuple[int, str], b: tuple[int, str]) -> bool:
        """Merge the sets of ``a`` and ``b``; True if they were apart."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[rb] = ra
        return True


def _label_counts(df: pd.DataFrame) -> dict[str, int]:
    counts = df["label"].value_counts()
    return {lab: int(counts.get(lab, 0)) for lab in LABELS}


def build_dataset(sources: list[tuple[str, Path]], out_dir: Path) -> dict[str, Any]:
    """Merge ``sources`` (``(kind, path)`` pairs) into ``out_dir/manifest.csv``; return the build summary.

    Steps: run each adapter; hash every image (``sha1`` column); of files with equal bytes keep the first
    (in source order, then row order) and drop the rest; merge the split groups of every set of duplicates
    (so patients linked by a shared picture stay together); write the manifest with ``image`` relative to
    ``out_dir`` and ``out_dir/build_summary.json``. The summary holds per input the adapter's summary plus
    ``kept_after_dedup``; overall ``labels``, ``by_source``, ``duplicates`` (``[kept, dropped]`` image pairs,
    relative to ``out_dir``), ``n_split_groups`` and ``n_groups_linked``
    (groups that now join images of two or more of the adapters' groups).
    """
    if not sources:
        raise CXRError("no sources given")
    out = abs_path(out_dir)
    frames: list[pd.DataFrame] = []
    inputs: list[dict[str, Any]] = []
    for i, (adapter, path) in enumerate(sources):
        if adapter not in ADAPTERS:
            raise CXRError(f"unknown source kind {adapter!r} (known: {', '.join(ADAPTERS)})", path)
        if adapter == "manifest" and abs_path(manifest_csv(path)) == out / MANIFEST_NAME:
            raise CXRError("the output folder is this input manifest's folder: it would be overwritten", path)
        loaded = ADAPTERS[adapter](Path(path))
        frames.append(loaded.records.assign(_input=i))
        inputs.append(dict(loaded.summary))
    df = pd.concat(frames, ignore_index=True).fillna("")
    if df.empty:
        raise CXRError("no images kept from any source", out)

    df["sha1"] = [file_sha1(p) for p in df["image"]]
    pairs_gh = zip(df["split_group"], df["sha1"], strict=True)
    df["split_group"] = [g if g.strip() else f"img:{h}" for g, h in pairs_gh]
    keys = list(zip(df["_input"].astype(int), df["split_group"], strict=True))
    groups = _Groups()
    for key in keys:
        groups.find(key)

    def rel(p: str) -> str:
        return Path(os.path.relpath(p, out)).as_posix()

    duplicate = df["sha1"].duplicated(keep="first").to_numpy()
    first_of = {h: i for i, h in reversed(list(enumerate(df["sha1"])))}
    pairs: list[list[str]] = []
    for i in duplicate.nonzero()[0]:
        j = first_of[df["sha1"].iat[i]]
        pairs.append([rel(df["image"].iat[j]), rel(df["image"].iat[i])])
        groups.union(keys[j], keys[i])

    # Name each merged group after its first row's group; suffix the input number on a clash.
    names: dict[tuple[int, str], str] = {}
    used: set[str] = set()
    for key in keys:
        root = groups.find(key)
        if root not in names:
            name, n = key[1], 0
            while name in used:
                n += 1
                name = f"{key[1]}@{key[0] + 1}" + (f".{n}" if n > 1 else "")
            names[root] = name
            used.add(name)
    df["split_group"] = [names[groups.find(k)] for k in keys]

    kept = df[~duplicate].copy()
    # Groups that now join kept images from two or more of the adapters' original groups.
    original = pd.Series([f"{k[0]}\x00{k[1]}" for k in keys])[~duplicate]
    linked = int((original.groupby(kept["split_group"].to_numpy()).nunique() > 1).sum())
    kept["image"] = [rel(p) for p in kept["image"]]
    for i, info in enumerate(inputs):
        info["kept_after_dedup"] = _label_counts(kept[kept["_input"] == i])
        info["duplicates_dropped"] = int((duplicate & (df["_input"] == i).to_numpy()).sum())
    kept = kept.drop(columns="_input")
    cols = list(REQUIRED_COLUMNS) + [c for c in kept.columns if c not in REQUIRED_COLUMNS]
    csv = write_manifest(kept[cols], out)

    summary: dict[str, Any] = {
        "manifest": str(csv),
        "n_images": int(len(kept)),
        "labels": _label_counts(kept),
        "by_source": {str(src): _label_counts(part) for src, part in kept.groupby("source", sort=True)},
        "n_split_groups": int(kept["split_group"].nunique()),
        "n_groups_linked": linked,
        "n_duplicates": len(pairs),
        "duplicates": pairs,
        "inputs": inputs,
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary

__all__ = ["MANIFEST_NAME", "SUMMARY_NAME", "build_dataset", "parse_source_arg"]
