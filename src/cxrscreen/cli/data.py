"""`cxrscreen data`: build a manifest from sources, and split it by a protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from cxrscreen.cli.app import _fail, _shown, console, data_app, out
from cxrscreen.errors import CXRError


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
    from cxrscreen.data.splits import split_by_protocol, write_split

    try:
        df = read_manifest(data_dir)
        split, messages = split_by_protocol(protocol, df, seed=seed, test_frac=test_frac, val_frac=val_frac,
                                            holdout_source=holdout_source, part=part)
        for m in messages:
            console.print(f"note: {m}", markup=False)
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

