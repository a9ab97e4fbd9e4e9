"""`cxrscreen localize`: cross-validate, fit and run the lung localizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cxrscreen.cli.app import _fail, _log, localize_app, out
from cxrscreen.errors import CXRError


@localize_app.command("cv")
def localize_cv(
    data: Annotated[Path, typer.Option(help="manifest folder with annotations/lung_boxes.coco.json")],
    out_json: Annotated[Path, typer.Option("--out", help="JSON with mAP@0.5 and mean IoU per fold")],
    k: Annotated[int, typer.Option(help="folds, grouped by split_group")] = 5,
    epochs: Annotated[int, typer.Option()] = 20,
    budget_minutes_per_fold: Annotated[float | None, typer.Option(help="training minutes per fold")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Grouped k-fold cross-validation of the lung localizer against the real lung boxes."""
    from cxrscreen.training.localizer import crossval_localizer

    try:
        result = crossval_localizer(data, k=k, epochs=epochs, seed=seed,
                                    budget_minutes_per_fold=budget_minutes_per_fold, log=_log)
    except CXRError as exc:
        _fail(exc)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2, default=str))
    out.print(f"localizer mAP@0.5 {result['map50']:.3f}, mean IoU {result['mean_iou']:.3f} "
              f"(atlas: {result['atlas']['map50']:.3f}, {result['atlas']['mean_iou']:.3f}); wrote {out_json}")


@localize_app.command("fit")
def localize_fit(
    data: Annotated[Path, typer.Option(help="manifest folder with annotations/lung_boxes.coco.json")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory for the localizer")],
    epochs: Annotated[int, typer.Option()] = 20,
    budget_minutes: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train the lung localizer on every annotated image."""
    from cxrscreen.training.localizer import fit_localizer

    try:
        fit_localizer(data, out_dir, epochs=epochs, seed=seed, budget_minutes=budget_minutes, log=_log)
    except CXRError as exc:
        _fail(exc)


@localize_app.command("label")
def localize_label(
    data: Annotated[Path, typer.Option(help="manifest folder")],
    out_csv: Annotated[Path, typer.Option("--out", help="boxes CSV (put it in the detector's run dir as boxes.csv)")],
    localizer: Annotated[Path | None, typer.Option(help="localizer run dir (default: atlas boxes)")] = None,
    min_score: Annotated[float, typer.Option(help="below this a lung falls back to the atlas box")] = 0.3,
    segmented: Annotated[
        bool, typer.Option(help="without --localizer: boxes of the bundled segmenter's lung masks (else the atlas)")
    ] = True,
) -> None:
    """Write lung boxes for every image: annotations, else the localizer, else the segmented lungs' boxes,
    else the atlas."""
    from cxrscreen.runs.run_dir import load_run
    from cxrscreen.training.localizer import label_boxes

    try:
        seg = None
        if segmented and not localizer:
            from cxrscreen.lungs.segmenter import bundled_segmenter

            seg = bundled_segmenter()
        summary = label_boxes(load_run(localizer) if localizer else None, data, out_csv, min_score=min_score,
                              segmenter=seg, log=_log)
    except CXRError as exc:
        _fail(exc)
    out.print_json(json.dumps(summary, default=str))

