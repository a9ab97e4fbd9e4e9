"""The classifier training recipe: data from a manifest + split, the loop, early stopping, resume.

`train(TrainConfig(...), data_dir, split_csv, out_dir)` writes a run directory (see `runs.py`).
A checkpoint is written after every epoch; calling `train` again on the same directory with the
same configuration continues from it, and a finished run is not trained again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from cxrscreen import CLASSES
from cxrscreen.data.dataset import XRayTensorDataset
from cxrscreen.data.subsets import SubsetData, load_train_val
from cxrscreen.engine.loop import EpochLoop, evaluate_epoch, train_one_epoch
from cxrscreen.engine.setup import setup_run
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha256
from cxrscreen.models.registry import count_parameters, create_model, get_spec
from cxrscreen.runs.provenance import package_versions
from cxrscreen.runs.run_dir import read_config, write_config
from cxrscreen.tasks.classification import class_weights, per_source_val, val_figures
from cxrscreen.training.config import TrainConfig, stored_run
from cxrscreen.training.stages import Stages
from cxrscreen.transforms.augment import eval_transform, train_transform


def epoch_sampler(cfg: TrainConfig, labels: np.ndarray, n_classes: int, generator: torch.Generator) -> Sampler[int]:
    """The images one epoch draws: min(cfg.max_train_images_per_epoch, all) of them, classes drawn evenly
    (with replacement) when cfg.balance is "sampler", else a random order without replacement."""
    n = min(cfg.max_train_images_per_epoch or len(labels), len(labels))
    if cfg.balance == "sampler":
        w = 1.0 / np.bincount(labels, minlength=n_classes)[labels]
        return WeightedRandomSampler(w.tolist(), n, replacement=True, generator=generator)
    return RandomSampler(range(len(labels)), num_samples=n, generator=generator)


def run_base_config(
    cfg: TrainConfig, kind: str, classes: list[str], data_dir: Path, split_csv: Path, tr: SubsetData, va: SubsetData
) -> dict[str, Any]:
    """The config.json fields every trained run shares: arch, kind, classes, preprocessing, training
    arguments, seed, package versions, and the data (manifest and split hashes, image counts, skipped files)."""
    return {
        "arch": cfg.arch,
        "kind": kind,
        "classes": classes,
        "preprocess": cfg.preprocess.to_dict(),
        "training": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "data": {
            "manifest": str(data_dir),
            "manifest_sha256": file_sha256(data_dir / "manifest.csv" if data_dir.is_dir() else data_dir),
            "split": str(split_csv),
            "split_sha256": file_sha256(split_csv),
            "train_images": int(len(tr.labels)),
            "val_images": int(len(va.labels)),
            "skipped_files": {**tr.errors, **va.errors},
        },
    }


def train(
    cfg: TrainConfig,
    data_dir: Path,
    split_csv: Path,
    out_dir: Path,
    *,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Train a classifier and write its run directory. Returns the final config dict.

    progress_factory(description, total) -> object with .update(n) and .close() (e.g. a rich bar).
    """
    data_dir, split_csv, out_dir = Path(data_dir), Path(split_csv), Path(out_dir)
    spec = get_spec(cfg.arch)
    if spec.kind != "classifier":
        from cxrscreen.training.detection import train_detector

        return train_detector(cfg, data_dir, split_csv, out_dir, log=log, progress_factory=progress_factory)
    if cfg.preprocess.image_size < spec.min_size:
        raise CXRError(f"{cfg.arch} needs image_size >= {spec.min_size}, got {cfg.preprocess.image_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if (old := stored_run(cfg, out_dir, log)) is not None:
        return old
    device, cache = setup_run(cfg)
    classes = list(CLASSES)

    def bar(desc: str, total: int) -> Any:
        return progress_factory(desc, total) if progress_factory else None

    tr, va = load_train_val(data_dir, split_csv, cache, classes, bar=bar, log=log)
    log(f"train {len(tr.labels)} images {np.bincount(tr.labels, minlength=3).tolist()}, "
        f"val {len(va.labels)} images {np.bincount(va.labels, minlength=3).tolist()} ({', '.join(classes)}); "
        f"cache hits {cache.hits}, decoded {cache.misses}")

    model = create_model(cfg.arch, num_classes=len(classes), in_chans=1, weights=cfg.weights).to(device)
    weight = class_weights(tr.labels, len(classes)) if cfg.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(
        weight=None if weight is None else weight.to(device), label_smoothing=cfg.label_smoothing
    )
    val_criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight)
    staged = cfg.linear_probe_epochs > 0 or cfg.frozen or cfg.backbone_lr_scale != 1.0
    stages = Stages(cfg, model, spec.head) if staged else None
    if stages is not None:
        optimizer = stages.optimizer()
        scheduler = stages.scheduler(optimizer)
    else:  # the recipe of runs made before staged training existed, unchanged
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))

    generator = torch.Generator().manual_seed(cfg.seed)
    train_ds = XRayTensorDataset(tr.images, tr.labels, train_transform(cfg.preprocess, cfg.augment))
    sampler = epoch_sampler(cfg, tr.labels, len(classes), generator)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                              drop_last=len(train_ds) > cfg.batch_size)
    val_loader = DataLoader(XRayTensorDataset(va.images, va.labels, eval_transform(cfg.preprocess)),
                            batch_size=max(cfg.batch_size, 64))

    loop = EpochLoop(cfg, out_dir, model, optimizer, generator, scheduler, log=log)
    loop.resume(device)

    base_config: dict[str, Any] = {
        **run_base_config(cfg, "classifier", classes, data_dir, split_csv, tr, va),
        "parameters": count_parameters(model),
        "finished": False,
    }
    write_config(out_dir, {**read_config(out_dir), **base_config} if loop.ckpt_path.is_file() else base_config)

    def run_epoch(epoch: int, out_of_time: Callable[[], bool] | None) -> dict[str, Any]:
        stage, keep_eval = stages.begin_epoch(epoch) if stages is not None else ("train", [])
        b = bar(f"epoch {epoch}/{cfg.epochs}", len(train_loader) * cfg.batch_size)
        train_loss, seen = train_one_epoch(model, train_loader, criterion, optimizer, device=device,
                                           on_batch=b.update if b else None, deadline=out_of_time,
                                           keep_eval=keep_eval)
        if b:
            b.close()
        val_loss, probs, labels = evaluate_epoch(model, val_loader, val_criterion, device=device)
        row = {"train_loss": train_loss, "val_loss": val_loss, "lr": optimizer.param_groups[-1]["lr"],
               "train_images": seen, "stage": stage}
        scheduler.step()
        if not len(labels):
            return row
        return {**row, **val_figures(probs, labels, classes), **per_source_val(probs, labels, va.sources, weight)}

    return loop.run(run_epoch, has_val=len(va.labels) > 0)

