"""`cxrscreen train`: a run directory from a manifest, a split and a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cxrscreen.cli.app import _Bar, _fail, _log, app
from cxrscreen.errors import CXRError


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
    from cxrscreen.training.config import TrainConfig
    from cxrscreen.training.train import train as run_training

    if nproc > 1:
        from cxrscreen.engine.distributed import launch_torchrun, under_torchrun

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
            cfg = TrainConfig.from_recipe({}, **overrides)
        if no_clahe:
            from cxrscreen.transforms.preprocess import PreprocessConfig

            cfg.preprocess = PreprocessConfig(**{**cfg.preprocess.to_dict(), "clahe": False})
        run_training(cfg, data, split, out_dir, log=_log, progress_factory=_Bar)
    except CXRError as exc:
        _fail(exc)

