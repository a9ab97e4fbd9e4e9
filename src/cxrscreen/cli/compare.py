"""`cxrscreen compare`: the study's model comparison (train and test every arm, report)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cxrscreen.cli.app import _Bar, _fail, _shown, app, console, out
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.formatting import format_value


@app.command()
def compare(
    config: Annotated[Path, typer.Option(help="comparison YAML (models, train defaults, clahe, seed, gpu_recipe)")],
    data: Annotated[Path, typer.Option(help="manifest folder")],
    split: Annotated[Path, typer.Option(help="split CSV (image,subset); every model is tested on its test subset")],
    out_dir: Annotated[Path, typer.Option("--out", help="report folder; its runs/ are resumed, finished ones skipped")],
    budget_minutes: Annotated[
        float | None, typer.Option(help="training minutes per model and CLAHE setting (overrides the config; 0 = none)")
    ] = None,
    gpu_recipe: Annotated[bool, typer.Option("--gpu-recipe", help="apply the config's gpu_recipe section")] = False,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (default: the recipe's)")] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(help="work only on the arms whose run name matches this pattern (fnmatch; repeatable)"),
    ] = None,
) -> None:
    """Train every (model, CLAHE on/off) pair of a config, test each, and write table.csv, plots, report.md/.html.

    Start it more than once on one --out to use more cores: each process skips the arms another one holds.
    """
    import shlex

    from cxrscreen.experiments.compare import run_compare
    from cxrscreen.experiments.report import arm_label

    def log(msg: str) -> None:
        console.print(msg, markup=False, highlight=False)

    try:
        result = run_compare(config, data, split, out_dir, budget_minutes=budget_minutes, device=device,
                             gpu_recipe=gpu_recipe, only=only, command=shlex.join(["cxrscreen", *sys.argv[1:]]),
                             log=log, progress_factory=_Bar)
    except CXRError as exc:
        _fail(exc)

    def num(v: float | None, digits: int = 3) -> str:
        return format_value(v, digits, missing="")

    table = Table(title=escape(f"{result['meta']['title']}: test subset (* reported by the study, not rerun)"))
    for col in ("run", "CLAHE", "status", "accuracy", "macro-F1", "COVID sens.", "COVID spec.", "COVID AUC", "img/s"):
        table.add_column(col, justify="left" if col in ("run", "CLAHE", "status") else "right")
    for r in result["table"]:
        table.add_row(r["run"] + (" *" if r["status"] == "reported" else ""), r["clahe"] or "", r["status"],
                      num(r["accuracy"]), num(r["macro_f1"]), num(r["covid_sensitivity"]),
                      num(r["covid_specificity"]), num(r["covid_auc"]), num(r["inference_images_per_s"], 1))
    out.print(table)
    for e in result["clahe_effect"]:
        if e.get("covid_auc_diff") is not None:
            out.print(f"CLAHE on - off, {arm_label(e)} {e['image_size']} px: macro-F1 {e['macro_f1_diff']:+.3f}, "
                      f"COVID AUC {e['covid_auc_diff']:+.3f}")
    console.print(f"wrote {_shown(out_dir / 'report.html')}, report.md, table.csv and compare.json", markup=False)
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    if failed:
        console.print(f"{len(failed)} run(s) failed: " + ", ".join(r["name"] for r in failed), markup=False)
        raise typer.Exit(1)
