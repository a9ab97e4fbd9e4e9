"""`cxrscreen segment`: right and left lung masks of X-rays, one PNG label map per input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cxrscreen.cli.app import _fail, _shown, app, console, out
from cxrscreen.errors import CXRError


@app.command()
def segment(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders (searched recursively)")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the mask PNGs (folder arguments' trees "
                                                        "mirrored; repeated names numbered)")],
    model: Annotated[Path | None, typer.Option(help="folder with lungs.json + lungs.safetensors (default: the "
                                                    "bundled lung model)")] = None,
    overlay: Annotated[bool, typer.Option("--overlay", help="also write <stem>_lungs_overlay.png: the lungs and "
                                                            "their Brixia thirds drawn on the X-ray")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Write <out>/<stem>_lungs.png per image at the image's size: 0 background, 1 right lung (the patient's
    right, the image's left), 2 left lung (the encoding of ../shared's lung masks).

    Exit status: 0 all done, 1 some input failed, 2 bad usage or no usable input.
    """
    from cxrscreen.io.xray import read_xray
    from cxrscreen.lungs.masks import draw_masks, write_mask
    from cxrscreen.lungs.segmenter import LungSegmenter
    from cxrscreen.predict.inputs import OutputNames, collect_inputs

    try:
        seg = LungSegmenter.load(model)
    except CXRError as exc:
        _fail(exc)
    inputs, empty = collect_inputs(paths)
    for folder in empty:
        console.print(f"error: {_shown(folder)}: no image files (PNG, JPEG, TIFF, BMP or DICOM) in this folder",
                      markup=False)
    if not inputs:
        raise typer.Exit(2)
    names = OutputNames(out_dir)
    failed = len(empty)
    for item in inputs:
        res: dict = {"path": str(item.path), "mask": None, "error": None}
        try:
            xray = read_xray(item.path)
            lungs = seg.segment(xray.pixels)
            res["mask"] = str(write_mask(lungs.mask, names.path(item.label, "lungs")))
            if overlay:
                from cxrscreen.explain.overlay import write_png

                res["overlay"] = str(write_png(draw_masks(xray.pixels, lungs.mask),
                                               names.path(item.label, "lungs_overlay")))
            res.update(lungs.summary())
        except CXRError as exc:
            res["error"] = exc.problem
            failed += 1
        if res["error"]:
            console.print(f"{_shown(res['path'])}: error: {_shown(res['error'])}", markup=False)
        if as_json:
            print(json.dumps(res))
        elif not res["error"]:
            fr = res["area_fraction"]
            out.print(f"{_shown(res['path'])}: {_shown(res['mask'])}  (right lung {100 * fr['right']:.1f} %, "
                      f"left lung {100 * fr['left']:.1f} % of the image)", markup=False)
    if failed:
        console.print(f"{failed} input(s) failed", markup=False)
        raise typer.Exit(1)
