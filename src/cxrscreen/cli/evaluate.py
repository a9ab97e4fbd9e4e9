"""`cxrscreen evaluate`: figures of a trained model on a manifest or a split (grouped CIs, per source)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cxrscreen.cli.app import _fail, _shown, app, console, out
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.formatting import format_ci
from cxrscreen.runs.decision import DecisionRule


def _print_eval(result: dict[str, Any], title: str) -> None:
    ci = format_ci

    table = Table(title=escape(_shown(title)))
    for col in ("scope", "n", "accuracy", "macro-F1", "COVID sensitivity", "COVID specificity", "COVID AUC"):
        table.add_column(col, justify="right" if col != "scope" else "left")
    rows = [("all", result)] + list(result.get("per_source", {}).items())
    for name, r in rows:
        c = r["covid_vs_rest"]
        table.add_row(name, str(r["n"]), f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}",
                      ci(c["sensitivity"]), ci(c["specificity"]), ci(c["auc"]))
    out.print(table)
    out.print(f"decision rule: {DecisionRule.from_dict(result.get('decision')).describe()}")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="manifest folder")],
    model: Annotated[Path | None, typer.Option(help="run directory (default: the bundled model)")] = None,
    split: Annotated[Path | None, typer.Option(help="split CSV; without it every image of --data")] = None,
    subset: Annotated[str, typer.Option(help="train | val | test")] = "test",
    out_json: Annotated[Path | None, typer.Option("--out", help="eval JSON to write")] = None,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the CIs")] = 1000,
    argmax: Annotated[bool, typer.Option("--argmax", help="ignore the stored COVID operating point")] = False,
    threshold: Annotated[float | None, typer.Option(help="call COVID at p(covid) >= this instead")] = None,
) -> None:
    """Evaluate a model: accuracy, macro-F1, per-class figures, COVID-vs-rest with grouped 95 % CIs, per source."""
    from cxrscreen.evaluation.evaluate import evaluate_run
    from cxrscreen.predict.predictor import load_model

    try:
        run = load_model(model)
        result = evaluate_run(run, data, split_csv=split, subset=subset, n_boot=n_boot,
                              use_operating_point=not argmax, threshold=threshold)
    except CXRError as exc:
        _fail(exc)
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2))
        console.print(f"wrote {_shown(out_json)}", markup=False)
    _print_eval(result, f"{run.arch} on {data} ({result['meta']['subset']})")
    for p, e in result["meta"]["skipped_files"].items():
        console.print(f"skipped {_shown(p)}: {_shown(e)}", markup=False)
