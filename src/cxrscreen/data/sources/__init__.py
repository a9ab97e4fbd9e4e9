"""Source adapters: each turns one data source layout into manifest rows.

Every adapter is ``load(path: Path) -> SourceRecords``; :data:`ADAPTERS` maps a kind name to it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cxrscreen.data.sources import cohen, folder, rsna
from cxrscreen.data.sources import manifest as manifest_source
from cxrscreen.data.sources.base import SourceRecords

Adapter = Callable[[Path], SourceRecords]

ADAPTERS: dict[str, Adapter] = {
    "manifest": manifest_source.load,
    "cohen": cohen.load,
    "rsna": rsna.load,
    "folder": folder.load,
}

__all__ = ["ADAPTERS", "Adapter", "SourceRecords"]
