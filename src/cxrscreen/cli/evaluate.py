"""`cxrscreen evaluate`, `calibrate`, `audit` and `compare`: figures of trained models."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cxrscreen.cli.app import _Bar, _fail, _log, _shown, app, console, out
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.decision import DecisionRule
from cxrscreen.evaluation.formatting import format_ci, format_value


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
            lung_boxes=lung_boxes, loso_sources=loso_source or None, device=device,
            log=_log, progress_factory=_Bar,
        )
    except CXRError as exc:
        _fail(exc)
    for finding in result["findings"]:
        out.print(f"- {finding}", markup=False)
    if result.get("masking", {}).get("shortcut_flag") or result.get("probe", {}).get("shortcut_flag"):
        console.print("shortcut flagged: read audit.md before trusting this model's figures", markup=False)


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


@app.command()
def calibrate(
    model: Annotated[Path, typer.Option(help="run directory to calibrate (its config.json is updated)")],
    data: Annotated[Path, typer.Option(help="manifest folder")],
    split: Annotated[Path, typer.Option(help="split CSV: fitted on val, reported on test")],
    target_sensitivity: Annotated[float, typer.Option(help="COVID sensitivity to reach on val")] = 0.95,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples for the test CIs")] = 1000,
) -> None:
    """Fit temperature scaling and the COVID operating point on val, report on test, store both in the run."""
    from cxrscreen.evaluation.calibration import calibrate_run

    try:
        result = calibrate_run(model, data, split, target_sensitivity=target_sensitivity, n_boot=n_boot)
    except CXRError as exc:
        _fail(exc)
    cal, op = result["calibration"], result["operating_point"]

    num = format_value

    table = Table(title=escape(f"calibration of {_shown(model)} (T = {cal['temperature']:.3f}, fitted on val)"))
    for col in ("subset", "n", "ECE before", "ECE after", "NLL before", "NLL after"):
        table.add_column(col, justify="right" if col != "subset" else "left")
    for name in ("val", "test"):
        r = result[name]
        if r is not None:
            table.add_row(name, str(r["n"]), *[num(r[k]) for k in ("ece_before", "ece_after", "nll_before",
                                                                    "nll_after")])
    out.print(table)
    out.print(f"COVID called at calibrated probability >= {op['threshold']:.4f} "
              f"(target sensitivity {op['target_sensitivity']:.2f} on val: "
              f"sensitivity {num(op['val_sensitivity'])}, specificity {num(op['val_specificity'])}; "
              f"{op['n_val_covid']} COVID / {op['n_val_other']} other)")
    out.print(f"on test: sensitivity {format_ci(op['test_sensitivity'])}, "
              f"specificity {format_ci(op['test_specificity'])}")
    chosen = DecisionRule.from_dict(result["decision"]["chosen"])
    out.print(f"decision rule stored: {chosen.describe()} ({result['decision']['chosen_by']}: "
              + ", ".join(f"{c['rule']['rule']} {c['worst']:.3f}" for c in result["decision"]["candidates"]
                          if c["worst"] is not None) + ")", markup=False)
    console.print(f"updated {_shown(model / 'config.json')}; wrote {_shown(model / 'eval' / 'calibration.json')} "
                  f"and {_shown(model / 'eval' / 'reliability.png')}", markup=False)

