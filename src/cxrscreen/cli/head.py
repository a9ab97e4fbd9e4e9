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

    def write(result: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "select.json", result)
        (out_dir / "select.md").write_text(select_markdown(result))

    try:
        cfg = SelectConfig.from_yaml(config)
        result = run_select(cfg, only=only, log=_log, on_result=write)
    except CXRError as exc:
        _fail(exc)
    out.print(json.dumps({"best": result["best"], "scores": {c["name"]: round(c["score"], 4)
                                                             for c in result["candidates"]},
                          "out": str(out_dir)}), markup=False)


@app.command("adapt")
def adapt(
    data: Annotated[Path, typer.Option(help="the site's manifest folder (its own labelled films)")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory of the adapted model")],
    model: Annotated[Path | None, typer.Option(help="feature-head run directory (default: the bundled model)")] = None,
    test_frac: Annotated[float, typer.Option(help="share of the site's films kept for the before/after test")] = 0.4,
    val_frac: Annotated[float, typer.Option(help="share of the rest for temperature and operating point")] = 0.2,
    replay_weight: Annotated[float, typer.Option(help="weight of the replayed training features")] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the CIs")] = 500,
) -> None:
    """Refit the model's head on a site's films (with a replay of its training features), test before and after."""
    from cxrscreen.training.adapt import adapt_run

    try:
        report = adapt_run(model, data, out_dir, test_frac=test_frac, val_frac=val_frac,
                           replay_weight=replay_weight, seed=seed, n_boot=n_boot, log=_log)
    except CXRError as exc:
        _fail(exc)
    b, a = report["site_test_before"], report["site_test_after"]
    out.print(json.dumps({"out": str(out_dir), "site_test_n": a["n"],
                          "before": {"accuracy": b["accuracy"], "covid_auc": b["covid_vs_rest"]["auc"]["value"],
                                     "recall": b["recall_present"]},
                          "after": {"accuracy": a["accuracy"], "covid_auc": a["covid_vs_rest"]["auc"]["value"],
                                    "recall": a["recall_present"]}}), markup=False)
