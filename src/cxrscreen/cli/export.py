"""`cxrscreen export`: a trained classifier as an ONNX file that predicts and serves on its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cxrscreen.cli.app import _fail, _shown, app, console, out
from cxrscreen.errors import CXRError


@app.command()
def export(
    out_path: Annotated[Path, typer.Option("--out", help="file to write (model.onnx)")],
    model: Annotated[Path | None, typer.Option(help="run directory (default: the bundled model)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
    lungs: Annotated[bool, typer.Option("--lungs", help="export the lung segmenter instead (--model: a folder "
                                                        "with lungs.json; default the bundled one)")] = False,
) -> None:
    """Export a classifier to ONNX (dynamic batch; preprocessing, classes, temperature, decision rule and gate
    in its metadata) for `predict --engine onnxruntime` and `serve --engine onnxruntime`; with --lungs, the lung
    segmenter (`cxrscreen.lungs.export.load_lungs_onnx` runs it without torch)."""
    from cxrscreen.predict.onnx_export import export_onnx
    from cxrscreen.predict.predictor import load_model

    if fmt != "onnx":
        console.print(f"error: unknown export format {fmt!r}; the one format is onnx", markup=False)
        raise typer.Exit(2)
    try:
        if lungs:
            from cxrscreen.lungs.export import export_lungs_onnx
            from cxrscreen.lungs.segmenter import LungSegmenter

            info = export_lungs_onnx(LungSegmenter.load(model), out_path, opset=opset)
        else:
            info = export_onnx(load_model(model), out_path, opset=opset)
    except CXRError as exc:
        _fail(exc)
    out.print_json(json.dumps(info))
    console.print(f"wrote {_shown(out_path)}", markup=False)
