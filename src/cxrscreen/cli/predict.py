"""`cxrscreen predict`, `explain` and `serve`: the model on files, folders and uploads."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cxrscreen.cli.app import _fail, _shown, app, console, out
from cxrscreen.errors import CXRError


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
    severity: Annotated[bool, typer.Option("--severity", help="add COVID-19 severity (geographic extent, opacity, "
                                                              "per lung, zones) to images not called normal")
                        ] = False,
    localizer: Annotated[Path | None, typer.Option(help="lung localizer run for --severity's lung boxes "
                                                        "(default: the atlas)")] = None,
    engine: Annotated[str, typer.Option(help="torch (a run directory) | onnxruntime (--model FILE.onnx from "
                                             "`cxrscreen export`)")] = "torch",
    out_file: Annotated[Path | None, typer.Option("--out", help="batch screening: stream one row per input to "
                                                              "this .csv or .jsonl file (see README)")] = None,
    workers: Annotated[int, typer.Option(help="--out: decoding worker processes (0: decode in this one)")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="--out: keep its rows and skip their inputs")] = False,
    shard: Annotated[str | None, typer.Option(help="--out: I/N, screen only shard I (from 0) of N")] = None,
    threads: Annotated[int | None, typer.Option(help="threads of the forward passes (default: one per core)")
                       ] = None,
    lung_check: Annotated[bool, typer.Option("--lung-check", help="the gate also withholds a diagnosis when the "
                                                                  "lung segmenter does not find two lungs of "
                                                                  "plausible size")] = False,
) -> None:
    """Class and probability of each class for every image; bad files are reported on stderr and skipped.

    Inputs are image files, folders and manifest .csv files (an `image` column). Images the input gate flags
    get no class and no probabilities (`no diagnosis` and the reasons).
    Exit status: 0 all done, 1 some input failed, 2 bad usage or no usable input.
    """
    from cxrscreen.predict.batch import gather_inputs
    from cxrscreen.predict.inputs import OutputNames
    from cxrscreen.predict.onnx_engine import load_for_engine
    from cxrscreen.predict.predictor import Predictor
    from cxrscreen.predict.prepared import format_probabilities

    if as_json and as_csv:
        console.print("error: --json and --csv exclude each other; choose one", markup=False)
        raise typer.Exit(2)
    if out_file is None and (resume or shard is not None):
        console.print("error: --resume and --shard go with --out FILE", markup=False)
        raise typer.Exit(2)
    if out_file is not None and (as_json or as_csv or heatmap is not None or severity):
        console.print("error: --out writes its own format (from its suffix), without heatmaps or severity; drop "
                      "--json, --csv, --heatmap and --severity", markup=False)
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
    if lung_check:
        if gate is None:
            console.print("error: --lung-check is a rule of the input gate, and this model has none", markup=False)
            raise typer.Exit(2)
        gate.lungs_rule = True
    try:
        rule = run.decision_rule(argmax=argmax, threshold=threshold)
    except CXRError as exc:
        _fail(exc)
    if out_file is not None:
        from cxrscreen.predict.batch import screen_command

        raise typer.Exit(screen_command(run, inputs, out_file, rule=rule, gate=gate, batch_size=batch_size,
                                        workers=workers, resume=resume, shard=shard, console=console,
                                        failed=len(empty)))
    from cxrscreen.severity.output import make_scorer, severity_csv, severity_csv_header, severity_text, with_zones

    scorer = make_scorer(run, severity, localizer, _fail)
    predictor = Predictor(run, batch_size=batch_size, gate=gate, rule=rule, severity=scorer)
    if not (as_json or as_csv):
        console.print(f"decision rule: {rule.describe()}", markup=False)
    draw = None
    names = None
    if heatmap is not None:
        names = OutputNames(heatmap)
        try:
            draw = run.task.drawer(run)  # Grad-CAM overlays for classifiers, the boxes for detectors
        except CXRError as exc:
            _fail(exc)
    writer = None
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["path", "class", *[f"p_{c}" for c in run.classes], "flags", "error", "heatmap",
                         *(["heatmap_in_lungs"] if heatmap is not None else []), *severity_csv_header(scorer)])
    failed = len(empty)
    labels = {str(i.path): i.label for i in inputs}
    for res, prep in predictor.predict_files([i.path for i in inputs]):
        if res["error"]:
            failed += 1
        elif names is not None and prep is not None and res["probabilities"] is not None:
            label = labels.get(res["path"], Path(Path(res["path"]).name))
            try:
                drawn = draw(prep, res, names.path(label, run.task.drawing), target)
                # the Grad-CAM drawer puts the zones' scores in its own band; a boxes picture gets one here
                res["heatmap"] = str(drawn if run.task.drawing == "heatmap" else with_zones(drawn, res))
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
                             ";".join(res["flags"]), res["error"] or "", res.get("heatmap") or "",
                             *([_cell(res.get("heatmap_in_lungs"))] if heatmap is not None else []),
                             *severity_csv(scorer, res)])
        elif res["error"]:
            continue
        elif res["class"] is None:
            out.print(f"{_shown(res['path'])}: no diagnosis ({_shown('; '.join(res['flags']))})", markup=False)
        else:
            out.print(f"{_shown(res['path'])}: {res['class']}  {format_probabilities(res['probabilities'])}"
                      + severity_text(res)
                      + (f"  heat in the lungs {100 * res['heatmap_in_lungs']:.0f} %"
                         if res.get("heatmap_in_lungs") is not None else "")
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
            argmax=False, threshold=None, severity=False, localizer=None, engine="torch", out_file=None, workers=0,
            resume=False, shard=None, threads=None, lung_check=False)


def _cell(value: float | None) -> str:
    """A CSV cell for an optional fraction."""
    return "" if value is None else f"{value:.4f}"


def _load_gate(run: Any) -> Any:
    """`gate.model.gate_for_run`, looked up at call time (tests replace this name)."""
    from cxrscreen.gate.model import gate_for_run

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

