"""The `cxrscreen` command line: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cxrscreen.decision import DecisionRule
from cxrscreen.errors import CXRError

# rich_markup_mode=None: plain click help (no "<bool>" after flags, no markup read in help texts)
app = typer.Typer(help="Screen chest X-rays for COVID-19 and other pneumonia.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
data_app = typer.Typer(help="Build dataset manifests and splits.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")
# stderr for messages, stdout for results; soft_wrap: a long line is never broken at 80 columns when piped
console = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False)


def _shown(text: object) -> str:
    """A path or file name as printed: control characters as escapes (\\n, \\x1b); print it with
    markup=False, or through rich.markup.escape, so that '[red]' stays literal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _log(msg: object) -> None:
    """Progress messages from the library: printed literally (they hold paths), on stderr."""
    console.print(str(msg), markup=False)


def _version(value: bool) -> None:
    if value:
        from cxrscreen import __version__

        print(f"cxrscreen {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Screen chest X-rays for COVID-19 and other pneumonia (research use only: not a medical device)."""


class _Bar:
    """A rich progress bar with the update(n) / close() interface the library expects."""

    def __init__(self, desc: str, total: int) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total)

    def update(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def close(self) -> None:
        self.progress.stop()


def _fail(exc: CXRError) -> None:
    console.print(f"error: {_shown(exc)}", markup=False)
    raise typer.Exit(2)


@data_app.command("build")
def data_build(
    source: Annotated[list[str], typer.Option("--source", help="KIND:PATH with KIND manifest|cohen|rsna|folder; "
                                                               "repeat for several sources")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write manifest.csv and build_summary.json")],
) -> None:
    """Merge sources into one manifest (images are referenced, never copied; duplicates kept once)."""
    from cxrscreen.data.build import build_dataset, parse_source_arg

    try:
        summary = build_dataset([parse_source_arg(s) for s in source], out_dir)
    except CXRError as exc:
        _fail(exc)
    out.print_json(json.dumps(summary, default=str))
    console.print(f"wrote {_shown(out_dir / 'manifest.csv')}", markup=False)


@data_app.command("split")
def data_split(
    data_dir: Annotated[Path, typer.Argument(help="manifest folder (or manifest.csv)")],
    out_csv: Annotated[Path, typer.Option("--out", help="split CSV to write (image,subset)")],
    protocol: Annotated[str, typer.Option(help="grouped | paper | source | combine")] = "grouped",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    test_frac: Annotated[float, typer.Option(help="grouped: fraction of groups for test")] = 0.2,
    val_frac: Annotated[float, typer.Option(help="fraction of the rest (grouped) or of train (paper) for val")] = 0.1,
    holdout_source: Annotated[str | None, typer.Option(help="source: the source that goes to test")] = None,
    part: Annotated[list[str] | None, typer.Option(
        help="combine: SPLIT_CSV=DATA_DIR of one merged source; every image keeps that split's subset")] = None,
) -> None:
    """Split a manifest into train / val / test, grouped by split_group so no patient crosses subsets."""
    from cxrscreen.data.manifest import read_manifest
    from cxrscreen.data.splits import combine_splits, read_split, split_grouped, split_paper, split_source, write_split

    try:
        df = read_manifest(data_dir)
        if protocol == "grouped":
            split = split_grouped(df, seed=seed, test_frac=test_frac, val_frac=val_frac)
        elif protocol == "paper":
            split, messages = split_paper(df, seed=seed, val_frac=val_frac)
            for m in messages:
                console.print(f"note: {m}", markup=False)
        elif protocol == "source":
            if not holdout_source:
                raise CXRError("--protocol source needs --holdout-source NAME")
            split = split_source(df, holdout_source=holdout_source, seed=seed, val_frac=val_frac)
        elif protocol == "combine":
            pairs = [p.split("=", 1) for p in part or []]
            if not pairs or any(len(p) != 2 for p in pairs):
                raise CXRError("--protocol combine needs --part SPLIT_CSV=DATA_DIR for each merged source")
            split = combine_splits(df, [(read_split(csv), read_manifest(d)) for csv, d in pairs])
        else:
            raise CXRError(f"unknown protocol {protocol!r}; use grouped, paper, source or combine")
        write_split(split, out_csv)
    except CXRError as exc:
        _fail(exc)
    merged = split.merge(df[["image", "label"]], on="image")
    table = Table(title=escape(f"{_shown(out_csv)} ({protocol}, seed {seed})"))
    table.add_column("subset")
    labels = sorted(merged["label"].unique())
    for lbl in labels:
        table.add_column(lbl, justify="right")
    for sub in ("train", "val", "test"):
        m = merged[merged["subset"] == sub]
        table.add_row(sub, *[str(int((m["label"] == lbl).sum())) for lbl in labels])
    out.print(table)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="manifest folder")],
    split: Annotated[Path, typer.Option(help="split CSV (image,subset)")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write (resumed if it exists)")],
    arch: Annotated[str | None, typer.Option(help="architecture from the registry (see `cxrscreen models`)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML recipe; command-line options override it")] = None,
    image_size: Annotated[int | None, typer.Option(help="model input side, pixels")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    weights: Annotated[str | None, typer.Option(help="none | imagenet")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    no_clahe: Annotated[bool, typer.Option("--no-clahe", help="switch CLAHE off (ablation)")] = False,
    budget_minutes: Annotated[float | None, typer.Option(help="stop training after this many minutes")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    boxes: Annotated[Path | None, typer.Option(help="detectors: lung boxes CSV (`cxrscreen localize label`)")] = None,
    nproc: Annotated[int, typer.Option(help="processes on this machine: above 1, torchrun starts that many "
                                            "DistributedDataParallel processes (see README)")] = 1,
) -> None:
    """Train a classifier (or detector) and write weights, config and per-epoch history to --out."""
    from cxrscreen.training import TrainConfig
    from cxrscreen.training import train as run_training

    if nproc > 1:
        from cxrscreen.distributed import launch_torchrun, under_torchrun

        if not under_torchrun():
            named = {"data": data, "split": split, "out": out_dir, "arch": arch, "config": config,
                     "image-size": image_size, "epochs": epochs, "batch-size": batch_size, "lr": lr,
                     "weights": weights, "seed": seed, "budget-minutes": budget_minutes, "device": device,
                     "boxes": boxes}
            args = [a for k, v in named.items() if v is not None for a in (f"--{k}", str(v))]
            raise typer.Exit(launch_torchrun(nproc, args + (["--no-clahe"] if no_clahe else [])))

    overrides: dict[str, Any] = {"arch": arch, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                                 "weights": weights, "seed": seed, "budget_minutes": budget_minutes,
                                 "device": device, "image_size": image_size,
                                 "boxes": None if boxes is None else str(boxes)}
    try:
        if config is not None:
            cfg = TrainConfig.from_yaml(config, **overrides)
        else:
            from cxrscreen.models.registry import get_spec
            from cxrscreen.transforms import PreprocessConfig

            size = overrides.pop("image_size")
            cfg = TrainConfig.from_dict({k: v for k, v in overrides.items() if v is not None})
            if size is None:
                size = get_spec(cfg.arch).default_size
            if size is not None:
                cfg.preprocess = PreprocessConfig(**{**cfg.preprocess.to_dict(), "image_size": size})
        if no_clahe:
            from cxrscreen.transforms import PreprocessConfig

            cfg.preprocess = PreprocessConfig(**{**cfg.preprocess.to_dict(), "clahe": False})
        run_training(cfg, data, split, out_dir, log=_log, progress_factory=_Bar)
    except CXRError as exc:
        _fail(exc)


def _ci(d: dict[str, Any] | None) -> str:
    """'0.950 [0.920, 0.970]' from {"value", "ci95"}."""
    if not d or d["value"] is None:
        return "n/a"
    lo_hi = d.get("ci95")
    return f"{d['value']:.3f}" + (f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "")


def _print_eval(result: dict[str, Any], title: str) -> None:
    ci = _ci

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
    from cxrscreen.evaluate import evaluate_run
    from cxrscreen.predict import load_model

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
    from cxrscreen.audit import run_audit
    from cxrscreen.predict import default_model_dir

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
) -> None:
    """Train every (model, CLAHE on/off) pair of a config, test each, and write table.csv, plots, report.md/.html."""
    import shlex

    from cxrscreen.compare import run_compare

    def log(msg: str) -> None:
        console.print(msg, markup=False, highlight=False)

    try:
        result = run_compare(config, data, split, out_dir, budget_minutes=budget_minutes, device=device,
                             gpu_recipe=gpu_recipe, command=shlex.join(["cxrscreen", *sys.argv[1:]]), log=log,
                             progress_factory=_Bar)
    except CXRError as exc:
        _fail(exc)

    def num(v: float | None, digits: int = 3) -> str:
        return "" if v is None else f"{v:.{digits}f}"

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
            out.print(f"CLAHE on - off, {e['arch']} {e['image_size']} px: macro-F1 {e['macro_f1_diff']:+.3f}, "
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
    from cxrscreen.calibration import calibrate_run

    try:
        result = calibrate_run(model, data, split, target_sensitivity=target_sensitivity, n_boot=n_boot)
    except CXRError as exc:
        _fail(exc)
    cal, op = result["calibration"], result["operating_point"]

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

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
    out.print(f"on test: sensitivity {_ci(op['test_sensitivity'])}, specificity {_ci(op['test_specificity'])}")
    chosen = DecisionRule.from_dict(result["decision"]["chosen"])
    out.print(f"decision rule stored: {chosen.describe()} ({result['decision']['chosen_by']}: "
              + ", ".join(f"{c['rule']['rule']} {c['worst']:.3f}" for c in result["decision"]["candidates"]
                          if c["worst"] is not None) + ")", markup=False)
    console.print(f"updated {_shown(model / 'config.json')}; wrote {_shown(model / 'eval' / 'calibration.json')} "
                  f"and {_shown(model / 'eval' / 'reliability.png')}", markup=False)


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders (searched recursively)")],
    model: Annotated[Path | None, typer.Option(help="run directory (default: the bundled model)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line (excludes --csv)")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV rows (excludes --json)")] = False,
    heatmap: Annotated[Path | None, typer.Option(help="folder for Grad-CAM overlay PNGs (folder arguments' "
                                                      "trees mirrored; repeated names numbered)")] = None,
    target: Annotated[str | None, typer.Option(help="class the heatmap explains (default: the predicted)")] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    argmax: Annotated[bool, typer.Option("--argmax", help="the most probable class, not the stored operating point")
                      ] = False,
    threshold: Annotated[float | None, typer.Option(help="call COVID at p(covid) >= this instead")] = None,
    engine: Annotated[str, typer.Option(help="torch (a run directory) | onnxruntime (--model FILE.onnx from "
                                             "`cxrscreen export`)")] = "torch",
    out_file: Annotated[Path | None, typer.Option("--out", help="batch screening: stream one row per input to "
                                                              "this .csv or .jsonl file (see README)")] = None,
    workers: Annotated[int, typer.Option(help="--out: decoding worker processes (0: decode in this one)")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="--out: keep its rows and skip their inputs")] = False,
    shard: Annotated[str | None, typer.Option(help="--out: I/N, screen only shard I (from 0) of N")] = None,
    threads: Annotated[int | None, typer.Option(help="threads of the forward passes (default: one per core)")
                       ] = None,
) -> None:
    """Class and probability of each class for every image; bad files are reported on stderr and skipped.

    Inputs are image files, folders and manifest .csv files (an `image` column). Images the input gate flags
    get no class and no probabilities (`no diagnosis` and the reasons).
    Exit status: 0 all done, 1 some input failed, 2 bad usage or no usable input.
    """
    from cxrscreen.batch import gather_inputs
    from cxrscreen.onnx_engine import load_for_engine
    from cxrscreen.predict import OutputNames, Predictor, format_probabilities

    if as_json and as_csv:
        console.print("error: --json and --csv exclude each other; choose one", markup=False)
        raise typer.Exit(2)
    if out_file is None and (resume or shard is not None):
        console.print("error: --resume and --shard go with --out FILE", markup=False)
        raise typer.Exit(2)
    if out_file is not None and (as_json or as_csv or heatmap is not None):
        console.print("error: --out writes its own format (from its suffix) and no heatmaps; drop --json, "
                      "--csv and --heatmap", markup=False)
        raise typer.Exit(2)
    if engine != "torch" and heatmap is not None:
        console.print("error: heatmaps (Grad-CAM) need gradients: use --engine torch", markup=False)
        raise typer.Exit(2)
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    try:
        run = load_for_engine(model, engine, threads=threads)
        inputs, empty = gather_inputs(paths)
    except CXRError as exc:
        _fail(exc)
    for folder in empty:
        console.print(f"error: {_shown(folder)}: no image files (PNG, JPEG, TIFF, BMP or DICOM) in this folder",
                      markup=False)
    if not inputs:
        raise typer.Exit(2)
    gate = _load_gate(run)
    try:
        rule = run.decision_rule(argmax=argmax, threshold=threshold)
    except CXRError as exc:
        _fail(exc)
    if out_file is not None:
        from cxrscreen.batch import screen_command

        raise typer.Exit(screen_command(run, inputs, out_file, rule=rule, gate=gate, batch_size=batch_size,
                                        workers=workers, resume=resume, shard=shard, console=console,
                                        failed=len(empty)))
    predictor = Predictor(run, batch_size=batch_size, gate=gate, rule=rule)
    if not (as_json or as_csv):
        console.print(f"decision rule: {rule.describe()}", markup=False)
    explainer = None
    names = None
    is_detector = run.config.get("kind") == "detector"
    if heatmap is not None:
        names = OutputNames(heatmap)
        if not is_detector:
            from cxrscreen.explain import Explainer

            explainer = Explainer(run)
    writer = None
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "class", *[f"p_{c}" for c in run.classes], "flags", "error", "heatmap"])
    failed = len(empty)
    labels = {str(i.path): i.label for i in inputs}
    for res, prep in predictor.predict_files([i.path for i in inputs]):
        if res["error"]:
            failed += 1
        elif names is not None and prep is not None and res["probabilities"] is not None:
            label = labels.get(res["path"], Path(Path(res["path"]).name))
            try:
                if is_detector:
                    from cxrscreen.models.detection import draw_boxes

                    res["heatmap"] = str(draw_boxes(prep.xray.pixels, res.get("boxes", []),
                                                    names.path(label, "boxes")))
                elif explainer is not None:
                    res["heatmap"] = str(explainer.write_overlay(prep, res, heatmap, target=target,
                                                                 out_path=names.path(label, "heatmap")))
            except CXRError as exc:
                res["error"] = f"heatmap failed: {exc.problem}"
                failed += 1
        elif names is not None:
            res["heatmap"] = None  # no diagnosis: nothing to explain
        if res["error"]:
            console.print(f"{_shown(res['path'])}: error: {_shown(res['error'])}", markup=False)
        if as_json:
            print(json.dumps(res))
        elif writer is not None:
            probs = res["probabilities"] or {}
            writer.writerow([res["path"], res["class"] or "",
                             *[f"{probs[c]:.4f}" if c in probs else "" for c in run.classes],
                             ";".join(res["flags"]), res["error"] or "", res.get("heatmap") or ""])
        elif res["error"]:
            continue
        elif res["class"] is None:
            out.print(f"{_shown(res['path'])}: no diagnosis ({_shown('; '.join(res['flags']))})", markup=False)
        else:
            out.print(f"{_shown(res['path'])}: {res['class']}  {format_probabilities(res['probabilities'])}"
                      + (f"  heatmap: {_shown(res['heatmap'])}" if res.get("heatmap") else ""), markup=False)
    if failed:
        console.print(f"{failed} input(s) failed", markup=False)
        raise typer.Exit(1)


@app.command()
def explain(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders (searched recursively)")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the Grad-CAM overlay PNGs")] = Path("heatmaps"),
    model: Annotated[Path | None, typer.Option(help="run directory (default: the bundled model)")] = None,
    target: Annotated[str | None, typer.Option(help="class the heatmap explains (default: the predicted)")] = None,
) -> None:
    """Write a Grad-CAM overlay per image (class and probabilities written on it); same as predict --heatmap."""
    predict(paths, model=model, as_json=False, as_csv=False, heatmap=out_dir, target=target, batch_size=8,
            argmax=False, threshold=None, engine="torch", out_file=None, workers=0, resume=False, shard=None,
            threads=None)


def _load_gate(run: Any) -> Any:
    try:
        from cxrscreen.gate import gate_for_run
    except ImportError:
        return None
    return gate_for_run(run)


@app.command()
def serve(
    model: Annotated[Path | None, typer.Option(help="run directory (default: the bundled model)")] = None,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 exposes it)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    threads: Annotated[int | None, typer.Option(help="torch threads for the forward passes (default: one per "
                                                     "core; 1 is faster on a machine busy with other work)")] = None,
    engine: Annotated[str, typer.Option(help="torch (a run directory) | onnxruntime (--model FILE.onnx)")] = "torch",
) -> None:
    """Serve the upload page and HTTP API for one model (research use only: not a medical device)."""
    from cxrscreen.serving import serve as serve_app

    try:
        serve_app(model, host=host, port=port, torch_threads=threads, engine=engine)
    except CXRError as exc:
        _fail(exc)


@app.command()
def export(
    out_path: Annotated[Path, typer.Option("--out", help="file to write (model.onnx)")],
    model: Annotated[Path | None, typer.Option(help="run directory (default: the bundled model)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
) -> None:
    """Export a classifier to ONNX (dynamic batch; preprocessing, classes, temperature, decision rule and gate
    in its metadata) for `predict --engine onnxruntime` and `serve --engine onnxruntime`."""
    from cxrscreen.onnx_engine import export_onnx
    from cxrscreen.predict import load_model

    if fmt != "onnx":
        console.print(f"error: unknown export format {fmt!r}; the one format is onnx", markup=False)
        raise typer.Exit(2)
    try:
        info = export_onnx(load_model(model), out_path, opset=opset)
    except CXRError as exc:
        _fail(exc)
    out.print_json(json.dumps(info))
    console.print(f"wrote {_shown(out_path)}", markup=False)


localize_app = typer.Typer(help="The lung localizer that labels lung boxes for the SSD detector.", no_args_is_help=True)
app.add_typer(localize_app, name="localize")


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
    from cxrscreen.localizer import crossval_localizer

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
    from cxrscreen.localizer import fit_localizer

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
) -> None:
    """Write lung boxes with scores for every image: annotations, else the localizer, else the atlas."""
    from cxrscreen.localizer import label_boxes
    from cxrscreen.runs import load_run

    try:
        summary = label_boxes(load_run(localizer) if localizer else None, data, out_csv, min_score=min_score,
                              log=_log)
    except CXRError as exc:
        _fail(exc)
    out.print_json(json.dumps(summary, default=str))


@app.command()
def models() -> None:
    """List the registered architectures."""
    from cxrscreen.models.registry import available_models, get_spec

    table = Table(title="architectures")
    for col in ("name", "kind", "default size", "CAM layer"):
        table.add_column(col)
    for name in available_models():
        s = get_spec(name)
        table.add_row(name, s.kind, str(s.default_size), s.cam_layer)
    out.print(table)


def main() -> None:
    """Entry point of the `cxrscreen` script."""
    app()


if __name__ == "__main__":
    main()
