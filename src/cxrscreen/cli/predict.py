"""`cxrscreen predict`, `explain` and `serve`: the model on files, folders and uploads."""

from __future__ import annotations

import json
from collections.abc import Sequence
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
    batch_size: Annotated[int, typer.Option(help="images read ahead, gated and predicted together (on the CPU "
                                                 "the network takes 8 of them per forward pass)")] = 32,
    argmax: Annotated[bool, typer.Option("--argmax", help="the most probable class, not the stored operating point")
                      ] = False,
    threshold: Annotated[float | None, typer.Option(help="call COVID at p(covid) >= this instead")] = None,
    severity: Annotated[bool, typer.Option("--severity", help="add COVID-19 severity (geographic extent, opacity, "
                                                              "per lung, zones) to images not called normal")
                        ] = False,
    localizer: Annotated[Path | None, typer.Option(help="lung localizer run for --severity's lung boxes "
                                                        "(default: the atlas)")] = None,
    engine: Annotated[str, typer.Option(help="torch (a run directory) | onnxruntime (--model FILE.onnx from "
                                             "`cxrscreen export`; --heatmap needs its run's weights beside it)")
                      ] = "torch",
    out_file: Annotated[Path | None, typer.Option("--out", help="batch screening: stream one row per input to "
                                                              "this .csv or .jsonl file (see README)")] = None,
    workers: Annotated[int, typer.Option(help="--out: decoding worker processes (0: decode in this one)")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="--out: keep its rows and skip their inputs")] = False,
    shard: Annotated[str | None, typer.Option(help="--out: I/N, screen only shard I (from 0) of N")] = None,
    threads: Annotated[int | None, typer.Option(help="threads of the forward passes (default: one per core)")
                       ] = None,
    dicom_out: Annotated[Path | None, typer.Option("--dicom-out", help="folder for a DICOM SR (TID 1500) and a "
                                                   "heatmap Secondary Capture per DICOM input")] = None,
    lung_check: Annotated[bool, typer.Option("--lung-check", help="the gate also withholds a diagnosis when the "
                                                                  "lung segmenter does not find two lungs of "
                                                                  "plausible size")] = False,
) -> None:
    """Class and probability of each class for every image; bad files are reported on stderr and skipped.

    Inputs are image files, folders and manifest .csv files (an `image` column). Images the input gate flags
    get no class and no probabilities (`no diagnosis` and the reasons).
    Exit status: 0 all done, 1 some input failed, 2 bad usage or no usable input.
    """
    from cxrscreen.predict.predictor import Predictor

    _check_usage(as_json=as_json, as_csv=as_csv, heatmap=heatmap, severity=severity, engine=engine,
                 out_file=out_file, resume=resume, shard=shard, dicom_out=dicom_out, batch_size=batch_size,
                 argmax=argmax, threshold=threshold, workers=workers)
    run, gathered = _load(model, engine, threads, target, paths)
    inputs, empty = gathered.inputs, gathered.empty
    gate = _gate_with_options(run, lung_check)
    try:
        rule = run.decision_rule(argmax=argmax, threshold=threshold)
    except CXRError as exc:
        _fail(exc)
    if out_file is not None:
        raise typer.Exit(_screen_to_file(run, inputs, out_file, rule=rule, gate=gate, batch_size=batch_size,
                                        workers=workers, resume=resume, shard=shard, console=console,
                                        failed=len(empty), problems=gathered.problems))
    from cxrscreen.severity.output import make_scorer

    scorer = make_scorer(run, severity, localizer, _fail)
    predictor = Predictor(run, batch_size=batch_size, gate=gate, rule=rule, severity=scorer)
    if not (as_json or as_csv):
        console.print(f"decision rule: {rule.describe()}", markup=False)
    pictures = _Pictures(run, heatmap, target) if heatmap is not None else None
    dicom = _DicomOut(run, dicom_out, target) if dicom_out is not None else None
    writer = _stdout_writer(run, as_json, as_csv, scorer is not None)
    failed = len(empty) + _predict_all(predictor, inputs, gathered.problems, writer, pictures, dicom)
    if failed:
        console.print(f"{failed} input(s) failed", markup=False)
        raise typer.Exit(1)


def _check_usage(*, as_json: bool, as_csv: bool, heatmap: Path | None, severity: bool, engine: str,
                 out_file: Path | None, resume: bool, shard: str | None, dicom_out: Path | None,
                 batch_size: int, argmax: bool, threshold: float | None, workers: int) -> None:
    """Exit with status 2 for option combinations predict refuses (each says why on stderr)."""
    from cxrscreen.predict.guard import check_predict_options

    if as_json and as_csv:
        console.print("error: --json and --csv exclude each other; choose one", markup=False)
        raise typer.Exit(2)
    if out_file is None and (resume or shard is not None):
        console.print("error: --resume and --shard go with --out FILE", markup=False)
        raise typer.Exit(2)
    if out_file is not None and (as_json or as_csv or heatmap is not None or severity or dicom_out is not None):
        console.print("error: --out writes its own format (from its suffix), without heatmaps or severity; drop "
                      "--json, --csv, --heatmap, --severity and --dicom-out", markup=False)
        raise typer.Exit(2)
    try:
        check_predict_options(batch_size=batch_size, argmax=argmax, threshold=threshold, workers=workers,
                              heatmap=heatmap, out_file=out_file, resume=resume, shard=shard)
    except CXRError as exc:
        _fail(exc)


def _load(model: Path | None, engine: str, threads: int | None, target: str | None, paths: list[Path]
          ) -> tuple[Any, Any]:
    """(the loaded run, the gathered inputs); errors on stderr: a bad model, target or argument exits 2 (also
    when no input is left), folders without images and unreadable inputs are reported."""
    from cxrscreen.predict.guard import check_target
    from cxrscreen.predict.inputs import gather
    from cxrscreen.predict.onnx_engine import load_for_engine

    if threads is not None and engine == "torch":  # ONNX Runtime takes its threads in load_for_engine
        import torch

        torch.set_num_threads(max(1, threads))
    try:
        with console.status("loading " + ("the bundled model" if model is None else _shown(model)) + " ..."):
            run = load_for_engine(model, engine, threads=threads)  # a spinner on a terminal, nothing when piped
        check_target(target, run.classes)
        gathered = gather(paths)
    except CXRError as exc:
        _fail(exc)
    for folder in gathered.empty:
        console.print(f"error: {_shown(folder)}: no image files (PNG, JPEG, TIFF, BMP or DICOM) in this folder",
                      markup=False)
    _report_gathered(gathered)
    if not gathered.inputs:
        raise typer.Exit(2)
    return run, gathered


def _gate_with_options(run: Any, lung_check: bool) -> Any:
    """The run's input gate (None without one), with the lung rule on for --lung-check (exit 2 without a
    gate)."""
    gate = _load_gate(run)
    if lung_check:
        if gate is None:
            console.print("error: --lung-check is a rule of the input gate, and this model has none", markup=False)
            raise typer.Exit(2)
        gate.lungs_rule = True
    return gate


def _predict_all(predictor: Any, inputs: Sequence[Any], problems: Sequence[CXRError], writer: Any,
                 pictures: _Pictures | None, dicom: _DicomOut | None) -> int:
    """Predict every input and write its result (stdout, --heatmap PNGs, --dicom-out files); inputs that could
    not be read or listed (`problems`) get their error rows. Returns how many inputs failed."""
    from cxrscreen.results.result import PredictionResult
    from cxrscreen.results.writers import MultiWriter

    sink = MultiWriter([writer, dicom.writer] if dicom is not None else [writer])
    failed = len(problems)
    labels = {str(i.path): i.label for i in inputs}
    sink.open()
    sink.write([PredictionResult.failed(p.path, p.problem) for p in problems])
    predictor.expect(len(inputs))
    bar = _progress(len(inputs))
    for result, prep in predictor.predict_files([i.path for i in inputs]):
        if bar is not None:
            bar.update(1)
        if result.error:
            failed += 1
        elif pictures is not None and prep is not None:
            failed += not pictures.add(result, prep, labels.get(result.path, Path(Path(result.path).name)))
        if result.error:
            console.print(f"{_shown(result.path)}: error: {_shown(result.error)}", markup=False)
        if dicom is not None:
            dicom.prepare(result, prep)
        n_errors = len(dicom.writer.errors) if dicom is not None else 0
        sink.write([result])
        if dicom is not None:
            dicom.pixels.clear()
            if len(dicom.writer.errors) > n_errors:
                failed += 1
                console.print(f"{_shown(result.path)}: error: {_shown(dicom.writer.errors[-1][1])}", markup=False)
    sink.close()
    if bar is not None:
        bar.close()
    return failed


class _Pictures:
    """--heatmap: the task drawer's picture of each result with a diagnosis (Grad-CAM for classifiers, the
    boxes for detectors), written as PNG under the folder (folder arguments' trees mirrored; repeated names
    numbered) and kept on the result for --dicom-out's Secondary Capture."""

    def __init__(self, run: Any, folder: Path, target: str | None) -> None:
        from cxrscreen.predict.inputs import OutputNames
        from cxrscreen.predict.onnx_engine import drawing_run

        self.names, self.tag, self.target = OutputNames(folder), run.task.drawing, target
        try:
            draw_run = drawing_run(run)  # ONNX Runtime: the PyTorch model beside the export draws Grad-CAM
            self.draw = draw_run.task.drawer(draw_run)
        except CXRError as exc:
            _fail(exc)

    def add(self, result: Any, prep: Any, label: Path) -> bool:
        """Draw and write the picture of one result (nothing for one without a diagnosis); False when that
        failed (the result's error then says why)."""
        from cxrscreen.explain.overlay import write_png

        if result.probabilities is None:
            return True  # no diagnosis: nothing to explain
        view = result.to_dict(identity=False)  # the drawer's dict view (it may add "heatmap_in_lungs")
        try:
            # the task's picture (caption above, severity zones below), then written: one drawing path
            picture = self.draw(prep, view, self.target)
            result.heatmap = str(write_png(picture, self.names.path(label, self.tag)))
        except CXRError as exc:
            result.error = f"heatmap failed: {exc.problem}"
            return False
        finally:
            result.heatmap_in_lungs = view.get("heatmap_in_lungs")
        result.picture = picture  # the Secondary Capture shows the same picture: no second Grad-CAM
        return True


class _DicomOut:
    """--dicom-out: an SR and a heatmap Secondary Capture per DICOM input (`results.dicom.DicomWriter`)."""

    def __init__(self, run: Any, folder: Path, target: str | None) -> None:
        from cxrscreen.results.dicom import DicomWriter, folder_store

        self.target = target
        self.pixels: dict[str, Any] = {}  # the X-ray behind each result being written, for its SC
        self.writer = DicomWriter(run, folder_store(folder), pixels_of=lambda r: self.pixels.get(r.path))
        from cxrscreen.predict.onnx_engine import heatmap_problem

        self.explainer = None
        if run.task.has_logits and heatmap_problem(run) is None:
            from cxrscreen.explain.cam import Explainer
            from cxrscreen.predict.onnx_engine import drawing_run

            try:
                self.explainer = Explainer(drawing_run(run))  # ONNX Runtime: the PyTorch model beside the export
            except CXRError as exc:
                _fail(exc)
        else:
            console.print("note: no heatmap Secondary Capture with this model or engine (Grad-CAM needs a "
                          "PyTorch classifier); the SR is written", markup=False)

    def prepare(self, result: Any, prep: Any) -> None:
        """Before the result is written: its Grad-CAM for the SC (unless --heatmap's picture is on it) and
        the X-ray's pixels; a note for an input that is no DICOM image."""
        if result.error:
            return
        if result.dicom is None:
            console.print(f"{_shown(result.path)}: no DICOM output (not a DICOM input with study and instance "
                          "UIDs)", markup=False)
            return
        if prep is None:
            return
        if self.explainer is not None and result.picture is None and result.probabilities:
            result.heatmap_array = self.explainer.heatmap(prep, self.target or result.label)
        self.pixels[result.path] = prep.xray.pixels


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
            resume=False, shard=None, threads=None, dicom_out=None, lung_check=False)


def _stdout_writer(run: Any, as_json: bool, as_csv: bool, severity: bool) -> Any:
    """predict's writer on stdout: JSON Lines, CSV (the one schema) or the text lines."""
    from cxrscreen.results.writers import CsvWriter, JsonlWriter, TextWriter

    return (JsonlWriter() if as_json else CsvWriter(run.classes, severity=severity) if as_csv
            else TextWriter(lambda line: out.print(line, markup=False)))


def _progress(total: int) -> Any:
    """A transient bar (images, images/s, ETA) on stderr for a multi-image run on a terminal, else None."""
    if total < 2 or not console.is_terminal:
        return None
    from cxrscreen.cli.progress import RichProgress

    return RichProgress(console, total, desc="predicting", log_every_s=None, transient=True)


def _report_gathered(gathered: Any) -> None:
    """Every input that could not be read or listed on stderr (one line each), and how many files in the
    folders were no supported image (the first few named)."""
    for problem in gathered.problems:
        console.print(f"{_shown(problem.path)}: error: {_shown(problem.problem)}" if problem.path
                      else f"error: {_shown(problem)}", markup=False)
    if gathered.skipped:
        shown = ", ".join(_shown(p) for p in gathered.skipped[:3])
        more = f" and {len(gathered.skipped) - 3} more" if len(gathered.skipped) > 3 else ""
        console.print(f"skipped {len(gathered.skipped)} file(s) in the folders that are no supported image "
                      f"(PNG, JPEG, TIFF, BMP or DICOM): {shown}{more}", markup=False)


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
    allowed_host: Annotated[list[str] | None, typer.Option(help="a Host name clients use (repeatable); others get "
                                                                "400. Default: the bound address (127.0.0.1 also "
                                                                "localhost); none checked for 0.0.0.0")] = None,
) -> None:
    """Serve the upload page and HTTP API for one model (research use only: not a medical device)."""
    from cxrscreen.serving import serve as serve_app

    try:
        serve_app(model, host=host, port=port, torch_threads=threads, engine=engine,
                  allowed_hosts=allowed_host or ())
    except CXRError as exc:
        _fail(exc)


def _exit_on_sigterm() -> None:
    """SIGTERM (a scheduler cancelling the job) ends the run like Ctrl-C: the output file is closed with
    every finished batch in it and the decode workers are shut down (the default action killed the
    process at once, leaving its workers). Only from the main thread; elsewhere nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, _: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _screen_to_file(run: Any, inputs: Sequence[Any], out_path: Path, *, rule: Any, gate: Any,
                   batch_size: int, workers: int, resume: bool, shard: str | None, console: Any,
                   failed: int = 0, problems: Sequence[CXRError] = ()) -> int:
    """`cxrscreen predict --out FILE` (batch.screen): screen, report on `console`, return the exit status (0 all done,
    1 some input failed, 2 bad usage). `problems`: inputs that could not be read or listed (each gets an
    error row)."""
    from cxrscreen.cli.progress import RichProgress
    from cxrscreen.predict.batch import Shard, screen
    from cxrscreen.predict.predictor import Predictor

    try:
        chosen = Shard.parse(shard)
        if workers < 0:
            raise CXRError(f"--workers must be 0 or more, not {workers}")
        predictor = Predictor(run, batch_size=batch_size, gate=None, rule=rule)
        _exit_on_sigterm()
        summary = screen(predictor, inputs, out_path, workers=workers, resume=resume, shard=chosen, gate=gate,
                         progress_factory=lambda total: RichProgress(console, total), problems=problems)
    except CXRError as exc:
        console.print(f"error: {exc}", markup=False)
        return 2
    console.print(json.dumps(summary.to_dict()), markup=False)
    bad = summary.errors + summary.earlier_errors
    if bad:
        console.print(f"{bad} input(s) failed (their rows in {out_path} give the error)", markup=False)
    return 1 if bad or failed else 0
