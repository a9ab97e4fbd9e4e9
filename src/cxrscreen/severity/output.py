"""How the CLI shows severity: the scorer from the options, CSV columns, the text suffix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrscreen.errors import CXRError

if TYPE_CHECKING:  # the scorer needs torch: imported only when severity is asked for (the ONNX path has none)
    from cxrscreen.severity.scorer import SeverityScorer

CSV_COLUMNS = ["geographic_extent", "opacity", "extent_right", "extent_left", "zones", "lung_boxes_source"]


def make_scorer(run: Any, wanted: bool, localizer: Path | None, fail: Callable[[CXRError], None]
                ) -> SeverityScorer | None:
    """The run's scorer when severity is wanted (with the localizer run if given), else None; `fail` on error."""
    if not wanted:
        return None
    from cxrscreen.data.lung_boxes import LUNG_CLASSES
    from cxrscreen.severity.scorer import SeverityScorer

    try:
        loc = None
        if localizer is not None:
            from cxrscreen.runs.run_dir import load_run

            loc = load_run(localizer)
            if tuple(loc.classes) != LUNG_CLASSES:
                raise CXRError(f"not a lung localizer (classes {loc.classes})", localizer)
        return SeverityScorer.for_run(run, localizer=loc)
    except CXRError as exc:
        fail(exc)
    return None


def severity_csv_header(scorer: SeverityScorer | None) -> list[str]:
    """The severity columns of predict's CSV (none without a scorer)."""
    return [] if scorer is None else list(CSV_COLUMNS)


def severity_csv(scorer: SeverityScorer | None, res: dict[str, Any]) -> list[str]:
    """One row's severity cells: empty where no severity is given."""
    if scorer is None:
        return []
    sev = res.get("severity")
    if not sev:
        return [""] * len(CSV_COLUMNS)
    zones = ";".join(f"{z['brixia']}:{z['extent_estimate']:.2f}" for z in sev["zones"])
    src = ";".join(f"{k}:{v}" for k, v in sev["lung_boxes_source"].items())
    return [f"{sev['geographic_extent']:.2f}", f"{sev['opacity']:.2f}", f"{sev['per_lung']['right']:.2f}",
            f"{sev['per_lung']['left']:.2f}", zones, src]


def severity_text(res: dict[str, Any]) -> str:
    """'  severity: extent 3.2/8, opacity 2.1/6 (estimate per lung: right 1.7/4, left 1.5/4)' or ''."""
    sev = res.get("severity")
    if not sev:
        return ""
    pl = sev["per_lung"]
    return (f"  severity: extent {sev['geographic_extent']:.1f}/8, opacity {sev['opacity']:.1f}/6 "
            f"(estimate per lung: right {pl['right']:.1f}/4, left {pl['left']:.1f}/4)")

