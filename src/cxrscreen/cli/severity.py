"""`cxrscreen severity cv|fit`: the cross-validation report and the regressor shipped with the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cxrscreen.cli.app import app
from cxrscreen.errors import CXRError

severity_app = typer.Typer(help="COVID-19 severity regressor (geographic extent 0-8, opacity 0-6).",
                           no_args_is_help=True, rich_markup_mode=None)
app.add_typer(severity_app, name="severity")


def _log(msg: object) -> None:
    typer.echo(str(msg), err=True)


@severity_app.command("cv")
def severity_cv(
    data: Annotated[Path, typer.Option(help="manifest folder with annotations/severity_scores.csv")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for cv.json and scatter.png")],
    candidate: Annotated[list[str] | None, typer.Option(help="feature set to try (repeat; default: all)")] = None,
    k: Annotated[int, typer.Option(help="folds, grouped by split_group")] = 5,
    repeats: Annotated[int, typer.Option(help="repeats with reshuffled groups")] = 10,
    seed: Annotated[int, typer.Option()] = 0,
    model: Annotated[Path | None, typer.Option(help="classifier run dir ('model' features; default: bundled)")] = None,
) -> None:
    """Repeated grouped K-fold CV of every candidate feature set and of the nested selection among them (the
    headline): MAE and Pearson r with 95 % CIs."""
    from cxrscreen.severity.cv import run_cv

    try:
        rep = run_cv(data, out_dir, candidates=candidate, k=k, repeats=repeats, seed=seed, classifier_dir=model,
                     log=_log)
    except CXRError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    nest = rep["nested"]
    typer.echo(json.dumps({"nested": {t: {m: nest[t][m] for m in ("mae", "pearson_r")} for t in rep["reference"]
                                      if t != "source"},
                           "chosen_counts": nest["chosen_counts"], "selected": rep["selected"],
                           "reference": rep["reference"]}, indent=2))


@severity_app.command("fit")
def severity_fit(
    data: Annotated[Path, typer.Option(help="manifest folder with annotations/severity_scores.csv")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for severity.safetensors and severity.json "
                                                        "(the bundled model's: src/cxrscreen/weights)")],
    candidate: Annotated[str, typer.Option(help="feature set (cv.json's 'selected': the nested procedure's most "
                                                "often chosen)")],
    cv_json: Annotated[Path | None, typer.Option("--cv", help="cv.json whose figures go into severity.json")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    model: Annotated[Path | None, typer.Option(help="classifier run dir ('model' features; default: bundled)")] = None,
) -> None:
    """Fit the regressor on every scored image and save it beside the model weights."""
    from cxrscreen.severity.cv import fit_shipped

    try:
        fit_shipped(data, out_dir, candidate, cv_json=cv_json, seed=seed, classifier_dir=model, log=_log)
    except CXRError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
