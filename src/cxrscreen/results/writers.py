"""The one writer protocol for prediction results, and its text, CSV and JSON Lines writers.

A writer (`ResultSink`) is opened once, given batches of `PredictionResult` (`write`) and closed; the CLI,
batch screening, the server and `cxrscreen pacs` all write through one. There is one CSV schema
(`csv_columns`): ``path, class, p_<class>..., flags, error, heatmap`` and, when severity is scored, the
severity columns; probabilities are written at full precision and every text cell goes through
`io.csvcell.safe_cell` (no raw control characters, no spreadsheet formula). The DICOM writer
(SR + Secondary Capture) is `results.dicom.DicomWriter`.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from cxrscreen.io.csvcell import escape_controls, safe_cell
from cxrscreen.results.result import PredictionResult

SEVERITY_COLUMNS = ["geographic_extent", "opacity", "extent_right", "extent_left", "zones", "lung_boxes_source"]


class ResultSink(Protocol):
    """Where results go: `open()` once, `write(batch)` any number of times, `close()` once."""

    def open(self) -> None: ...

    def write(self, results: Sequence[PredictionResult]) -> None: ...

    def close(self) -> None: ...


def as_result(res: PredictionResult | dict[str, Any]) -> PredictionResult:
    """A result's JSON object (`PredictionResult.to_dict`'s shape) as a PredictionResult; a PredictionResult
    unchanged."""
    return res if isinstance(res, PredictionResult) else PredictionResult.from_dict(res)


def csv_columns(classes: Sequence[str], *, severity: bool = False) -> list[str]:
    """The CSV header for a model with these classes."""
    return ["path", "class", *[f"p_{c}" for c in classes], "flags", "error", "heatmap", "heatmap_in_lungs",
            *(SEVERITY_COLUMNS if severity else [])]


def _severity_cells(sev: dict[str, Any] | None) -> list[str]:
    if not sev:
        return [""] * len(SEVERITY_COLUMNS)
    zones = ";".join(f"{z['brixia']}:{z['extent_estimate']:.2f}" for z in sev["zones"])
    src = ";".join(f"{k}:{v}" for k, v in sev["lung_boxes_source"].items())
    return [f"{sev['geographic_extent']:.2f}", f"{sev['opacity']:.2f}", f"{sev['per_lung']['right']:.2f}",
            f"{sev['per_lung']['left']:.2f}", zones, src]


def csv_cells(res: PredictionResult | dict[str, Any], classes: Sequence[str], *, severity: bool = False
              ) -> list[str]:
    """One CSV row (as `csv_columns`): empty probability cells when withheld or failed."""
    r = as_result(res)
    probs = r.probabilities or {}
    cells: list[Any] = [r.path, r.label, *[repr(float(probs[c])) if c in probs else "" for c in classes],
                        ";".join(r.flags), r.error, r.heatmap,
                        "" if r.heatmap_in_lungs is None else f"{r.heatmap_in_lungs:.3f}"]
    if severity:
        cells += _severity_cells(r.severity)
    return [safe_cell(c) for c in cells]


class CsvWriter:
    """CSV rows (`csv_columns`) to a text stream (default stdout); the header on `open`."""

    def __init__(self, classes: Sequence[str], stream: TextIO | None = None, *, severity: bool = False) -> None:
        self.classes, self.severity = list(classes), severity
        self.stream = stream
        self._csv: Any = None

    def open(self) -> None:
        self._csv = csv.writer(self.stream or sys.stdout, lineterminator="\n")
        self._csv.writerow(csv_columns(self.classes, severity=self.severity))

    def write(self, results: Sequence[PredictionResult]) -> None:
        for r in results:
            self._csv.writerow(csv_cells(r, self.classes, severity=self.severity))

    def close(self) -> None:
        (self.stream or sys.stdout).flush()


class JsonlWriter:
    """One JSON object per result and line (`PredictionResult.to_dict`) to a text stream (default stdout)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def open(self) -> None:
        pass

    def write(self, results: Sequence[PredictionResult]) -> None:
        out = self.stream or sys.stdout
        for r in results:
            out.write(json.dumps(r.to_dict()) + "\n")

    def close(self) -> None:
        (self.stream or sys.stdout).flush()


def text_line(r: PredictionResult) -> str | None:
    """The line people read for one result: 'PATH: CLASS  covid 4.1 %, ...', 'PATH: no diagnosis (REASONS)';
    None for a failed input (its error is reported on stderr). Paths are shown with control characters
    escaped."""
    from cxrscreen.predict.prepared import format_probabilities

    path = escape_controls(r.path)
    if r.error:
        return None
    if r.label is None or r.probabilities is None:
        return f"{path}: no diagnosis ({escape_controls('; '.join(r.flags))})"
    line = f"{path}: {r.label}  {format_probabilities(r.probabilities)}"
    sev = r.severity
    if sev:
        pl = sev["per_lung"]
        line += (f"  severity: extent {sev['geographic_extent']:.1f}/8, opacity {sev['opacity']:.1f}/6 "
                 f"(estimate per lung: right {pl['right']:.1f}/4, left {pl['left']:.1f}/4)")
    if r.heatmap_in_lungs is not None:
        line += f"  heat in the lungs {100 * r.heatmap_in_lungs:.0f} %"
    if r.heatmap:
        line += f"  heatmap: {escape_controls(r.heatmap)}"
    return line


class TextWriter:
    """`text_line` per result through `emit` (default: print to stdout)."""

    def __init__(self, emit: Callable[[str], None] | None = None) -> None:
        self.emit = emit or print

    def open(self) -> None:
        pass

    def write(self, results: Sequence[PredictionResult]) -> None:
        for r in results:
            line = text_line(r)
            if line is not None:
                self.emit(line)

    def close(self) -> None:
        pass


class MultiWriter:
    """Several writers as one (e.g. the CLI's text output and the DICOM files)."""

    def __init__(self, writers: Sequence[ResultSink]) -> None:
        self.writers = list(writers)

    def open(self) -> None:
        for w in self.writers:
            w.open()

    def write(self, results: Sequence[PredictionResult]) -> None:
        for w in self.writers:
            w.write(results)

    def close(self) -> None:
        for w in self.writers:
            w.close()
