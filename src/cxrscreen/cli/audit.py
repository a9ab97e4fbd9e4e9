"""`cxrscreen audit`: the shortcut audit of a trained classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrscreen.cli.app import _Bar, _fail, _log, app, console, out
from cxrscreen.errors import CXRError


@app.command()
def audit(
    data: Annotated[Path, typer.Option(help="manifest folder")],
    split: Annotated[Path, typer.Option(help="split CSV of the model (its test subset is audited)")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for audit.json, audit.md, plots, LOSO runs")],
    model: Annotated[Path | None, typer.Option(help="run directory (default: the bundled model)")] = None,
    parts: Annotated[str, typer.Option(help="comma-separated subset of per_source,masking,probe,loso")] = (
        "per_source,masking,probe,loso"
    ),
    budget_minutes: Annotated[
        float, typer.Option(help="minutes per trained model (probe, each LOSO model); 0 = the recipe's own")
    ] = 5.0,
    epochs: Annotated[int | None, typer.Option(help="epochs per trained model (default: recipe)")] = None,
    loso_source: Annotated[
        list[str] | None,
        typer.Option("--loso-source", help="source to hold out, repeatable (default: all with >= 50 images)"),
    ] = None,
    lung_boxes: Annotated[
        Path | None, typer.Option(help="COCO lung boxes (default: DATA/annotations/lung_boxes.coco.json)")
    ] = None,
    lung_source: Annotated[
        str, typer.Option(help="lungs of the masking test: segmenter (compared with boxes) | boxes")
    ] = "segmenter",
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the CIs")] = 500,
    seed: Annotated[int, typer.Option(help="seed of the probe / LOSO splits and of the bootstrap")] = 0,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (default: the recipe's)")] = None,
) -> None:
    """Shortcut audit: per-source figures, lungs masked / lungs only, source probe, leave-one-source-out."""
    from cxrscreen.audit.run import run_audit
    from cxrscreen.predict.predictor import default_model_dir

    try:
        result = run_audit(
            model if model is not None else default_model_dir(), data, split, out_dir,
            budget_minutes_per_model=budget_minutes or None, loso_epochs=epochs,
            parts=[p.strip() for p in parts.split(",") if p.strip()], n_boot=n_boot, seed=seed,
            lung_boxes=lung_boxes, lung_source=lung_source, loso_sources=loso_source or None, device=device,
            log=_log, progress_factory=_Bar,
        )
    except CXRError as exc:
        _fail(exc)
    for finding in result["findings"]:
        out.print(f"- {finding}", markup=False)
    if result.get("masking", {}).get("shortcut_flag") or result.get("probe", {}).get("shortcut_flag"):
        console.print("shortcut flagged: read audit.md before trusting this model's figures", markup=False)
