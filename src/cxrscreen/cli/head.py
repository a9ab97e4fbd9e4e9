"""`cxrscreen fit-head`, `select` and `adapt`: feature-head models (frozen ImageNet features + a fitted head)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cxrscreen.cli.app import _Bar, _fail, _log, app, out
from cxrscreen.errors import CXRError


def _stages(text: str | None) -> list[str] | None:
    """'2,3,4' or 'blocks.2,head' -> ['blocks.2', 'blocks.3', ...]; None stays None."""
    if text is None:
        return None
    return [s if s == "head" or s.startswith("blocks.") else f"blocks.{s}" for s in
            (p.strip() for p in text.split(",")) if s]


@app.command("fit-head")
def fit_head(
    data: Annotated[Path, typer.Option(help="manifest folder")],
    split: Annotated[Path, typer.Option(help="split CSV: the head is fitted on train, calibrated on val")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write")],
    config: Annotated[Path | None, typer.Option(help="YAML head recipe (`head:` block); options override it")] = None,
    arch: Annotated[str | None, typer.Option(help="lite0_features | lite1_features | lite2_features")] = None,
    stages: Annotated[str | None, typer.Option(help="pooled stages, e.g. 2,3,4,5,6 or head")] = None,
    image_size: Annotated[int | None, typer.Option(help="model input side, pixels")] = None,
    flip: Annotated[bool | None, typer.Option("--flip/--no-flip", help="average with the mirrored image")] = None,
    clahe: Annotated[bool | None, typer.Option("--clahe/--no-clahe")] = None,
    resize_mode: Annotated[str | None, typer.Option(help="crop | pad")] = None,
    source: Annotated[list[str] | None, typer.Option(help="train only on this source (repeatable)")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    no_calibrate: Annotated[bool, typer.Option("--no-calibrate", help="skip temperature / operating point")] = False,
) -> None:
    """Fit a frozen-feature model's head (grouped CV for its penalty), write a run directory, calibrate on val."""
    from cxrscreen.training.head import HeadRecipe, fit_head_run

    overrides: dict[str, Any] = {"arch": arch, "stages": _stages(stages), "image_size": image_size, "flip": flip,
                                 "clahe": clahe, "resize_mode": resize_mode, "sources": source or None, "seed": seed}
    try:
        if config is not None:
            recipe = HeadRecipe.from_yaml(config, **overrides)
        else:
            recipe = HeadRecipe.from_dict({k: v for k, v in overrides.items() if v is not None})
        cfg = fit_head_run(recipe, data, split, out_dir, log=_log, calibrate=not no_calibrate, progress_factory=_Bar)
    except CXRError as exc:
        _fail(exc)
    summary = {"out": str(out_dir), "chosen_C": cfg["training"]["chosen_C"], "train_seconds": cfg["train_seconds"],
               "temperature": (cfg.get("calibration") or {}).get("temperature"), "decision": cfg.get("decision")}
    out.print(json.dumps(summary), markup=False)


@app.command("select")
def select(
    config: Annotated[Path, typer.Option(help="selection YAML: data, splits, candidates (see training/select.py)")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for select.json and select.md")] = Path(
        "docs/results/select"),
    only: Annotated[list[str] | None, typer.Option(help="evaluate only this candidate (repeatable)")] = None,
) -> None:
    """Compare feature-head recipes: cxr and siim grouped tests, the external set, leave-one-source-out."""
    from cxrscreen.io.files import write_json
    from cxrscreen.training.select import SelectConfig, run_select, select_markdown

    try:
        cfg = SelectConfig.from_yaml(config)
        result = run_select(cfg, only=only, log=_log)
    except CXRError as exc:
        _fail(exc)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "select.json", result)
    (out_dir / "select.md").write_text(select_markdown(result))
    out.print(json.dumps({"best": result["best"], "scores": {c["name"]: round(c["score"], 4)
                                                             for c in result["candidates"]},
                          "out": str(out_dir)}), markup=False)
