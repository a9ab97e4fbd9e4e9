"""The SSD detector recipe: same data, split, preprocessing and run directory as the classifiers.

``train_detector(TrainConfig(arch="ssd300_vgg16", ...), data_dir, split_csv, out_dir)`` (called by
``training.train`` for registry kind "detector") writes model.safetensors, config.json ("kind":
"detector", "image_rule", "boxes_source", ...), history.csv and checkpoint.pt; it resumes from the
checkpoint and does not train a finished run again, like ``training.train``.

Targets. Every image gets its two lung boxes, each labelled with the image's class (detector label
class index + 1): annotated boxes where the COCO file covers the image, else the rows of the boxes
file ``cfg.boxes`` (or ``<out_dir>/boxes.csv`` if that exists; written beforehand by
``localizer.label_boxes``), else the atlas (``localizer.BoxSource``). Boxes are mapped into the
preprocessed square with the image's ``Geometry`` and clipped; a box cut away by the centre crop is dropped.

Recipe. AdamW (``cfg.lr``, ``cfg.weight_decay``) with a linear warm-up over the first epoch (at most
500 iterations) and the SSD paper's steps (x0.1 after 2/3 and after 5/6 of the epochs); the SSD
augmentation (``detection.DetectionAugment``). ``balance="sampler"`` samples classes evenly; the SSD
loss has no class weights, so ``balance="loss"`` trains unweighted (recorded in config.json).
Validation runs once per epoch in eval mode and gives val_loss (SSD losses), the image-rule metrics
of ``training`` and val_map50 (boxes labelled by class, mAP@0.5).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxrscreen import CLASSES
from cxrscreen.data.lung_boxes import BoxSource, image_sizes, size_of
from cxrscreen.data.subsets import SubsetData, load_train_val
from cxrscreen.engine.loop import EpochLoop
from cxrscreen.engine.setup import setup_run
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.metrics import mean_average_precision
from cxrscreen.models.detectors import check_input_size, create_detector
from cxrscreen.models.registry import count_parameters, get_spec
from cxrscreen.runs.run_dir import read_config, write_config
from cxrscreen.tasks.classification import val_figures
from cxrscreen.tasks.detection import (
    IMAGE_RULE,
    DetectionDataset,
    collate,
    evaluate,
    image_probabilities,
    lr_factor,
    train_one_epoch,
)
from cxrscreen.training.config import HISTORY_COLUMNS, TrainConfig, stored_run
from cxrscreen.training.train import epoch_sampler, run_base_config
from cxrscreen.transforms.boxes import DetectionAugment, boxes_to_model
from cxrscreen.transforms.preprocess import PreprocessConfig, geometry_for

BOXES_FILE = "boxes.csv"
DET_HISTORY_COLUMNS = [*HISTORY_COLUMNS, "val_map50"]


def subset_targets(
    data: SubsetData,
    source: BoxSource,
    preprocess: PreprocessConfig,
    sizes: dict[str, tuple[int, int]],
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, int]]:
    """Boxes (model pixels) and detector labels (class + 1) per image of a subset, and box-source counts."""
    boxes, labels, counts = [], [], {}
    for path, cls in zip(data.paths, data.labels, strict=True):
        hw = size_of(path, sizes)
        ib = source.get(path, hw)
        mb, _ = boxes_to_model(geometry_for(preprocess, hw), ib.boxes)
        boxes.append(mb)
        labels.append(np.full(len(mb), int(cls) + 1, np.int64))
        counts[ib.source] = counts.get(ib.source, 0) + 1
    return boxes, labels, counts


def train_detector(
    cfg: TrainConfig,
    data_dir: Path,
    split_csv: Path,
    out_dir: Path,
    *,
    log: Callable[[str], None] = print,
    progress_factory: Callable[[str, int], Any] | None = None,
) -> dict[str, Any]:
    """Train an SSD detector and write its run directory. Returns the final config dict.

    cfg.arch must be a registered detector; cfg.weights "none" or "imagenet" (the backbone);
    cfg.preprocess.image_size 300 for ssd300_vgg16. See the module docstring for the recipe.
    """
    data_dir, split_csv, out_dir = Path(data_dir), Path(split_csv), Path(out_dir)
    if get_spec(cfg.arch).kind != "detector":
        raise CXRError(f"{cfg.arch} is not a detector")
    check_input_size(cfg.arch, cfg.preprocess.image_size)
    boxes_file = Path(cfg.boxes) if cfg.boxes else out_dir / BOXES_FILE
    if cfg.boxes and not boxes_file.is_file():
        raise CXRError("boxes file not found (write it with `cxrscreen localize label`)", boxes_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (old := stored_run(cfg, out_dir, log)) is not None:
        return old
    device, cache = setup_run(cfg)
    classes = list(CLASSES)

    def bar(desc: str, total: int) -> Any:
        return progress_factory(desc, total) if progress_factory else None

    tr, va = load_train_val(data_dir, split_csv, cache, classes, bar=bar, log=log)

    source = BoxSource.for_data(data_dir, boxes_file)
    sizes = image_sizes(data_dir)
    tr_boxes, tr_lbls, tr_src = subset_targets(tr, source, cfg.preprocess, sizes)
    va_boxes, va_lbls, va_src = subset_targets(va, source, cfg.preprocess, sizes)
    log(f"train {len(tr.labels)} images {np.bincount(tr.labels, minlength=3).tolist()}, "
        f"val {len(va.labels)} images {np.bincount(va.labels, minlength=3).tolist()} ({', '.join(classes)}); "
        f"boxes: train {tr_src}, val {va_src}; cache hits {cache.hits}, decoded {cache.misses}")

    model = create_detector(cfg.arch, num_classes=len(classes), weights_backbone=cfg.weights).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    size = cfg.preprocess.image_size
    generator = torch.Generator().manual_seed(cfg.seed)
    train_ds = DetectionDataset(tr.images, tr_boxes, tr_lbls, DetectionAugment(size))
    sampler = epoch_sampler(cfg, tr.labels, len(classes), generator)
    n_per_epoch = len(sampler)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                              collate_fn=collate, drop_last=n_per_epoch > cfg.batch_size)
    val_loader = DataLoader(DetectionDataset(va.images, va_boxes, va_lbls), batch_size=cfg.batch_size,
                            collate_fn=collate)
    warmup = min(len(train_loader), 500)

    loop = EpochLoop(cfg, out_dir, model, optimizer, generator, history_columns=DET_HISTORY_COLUMNS, log=log)
    loop.resume(device)

    base_config: dict[str, Any] = {
        **run_base_config(cfg, "detector", classes, data_dir, split_csv, tr, va),
        "image_rule": IMAGE_RULE,
        "boxes_source": {**source.describe(), "train_images_by_source": tr_src, "val_images_by_source": va_src},
        "detector": {
            "labels": "detector label k + 1 is classes[k]; 0 is background",
            "input": "grey (1, S, S) in [0, 1]; normalised inside the model (mean 0.5, std 0.25), no resize",
            "weights_backbone": cfg.weights,
            "optimizer": "adamw",
            "schedule": f"linear warm-up over {warmup} iterations, x0.1 after 2/3 and after 5/6 of the epochs",
            "augmentation": "photometric, zoom-out, IoU crop, horizontal flip, sanitise (SSD paper)",
            "balance_applied": "sampler" if cfg.balance == "sampler" else "none",
        },
        "parameters": count_parameters(model),
        "finished": False,
    }
    if cfg.balance == "loss":
        log("balance 'loss': the SSD loss has no class weights; training unweighted (use 'sampler' to balance)")
    write_config(out_dir, {**read_config(out_dir), **base_config} if loop.ckpt_path.is_file() else base_config)

    val_truths = [(b, lb) for b, lb in zip(va_boxes, va_lbls, strict=True)]

    def run_epoch(epoch: int, out_of_time: Callable[[], bool] | None) -> dict[str, Any]:
        def lr_at(s: int) -> float:
            return cfg.lr * lr_factor(s, epoch, epochs=cfg.epochs, warmup_steps=warmup)

        b = bar(f"epoch {epoch}/{cfg.epochs}", n_per_epoch)
        train_loss, seen, loop.extra["step"] = train_one_epoch(
            model, train_loader, optimizer, device=device, lr_at=lr_at, step=loop.extra.get("step", 0),
            on_batch=b.update if b else None, deadline=out_of_time)
        if b:
            b.close()
        val_loss, dets = evaluate(model, val_loader, device=device)
        row: dict[str, Any] = {"train_loss": train_loss, "val_loss": val_loss,
                               "lr": optimizer.param_groups[0]["lr"], "train_images": seen}
        if len(va.labels):
            row.update(val_figures(image_probabilities(dets, len(classes)), va.labels, classes))
            row["val_map50"] = mean_average_precision(dets, val_truths, range(1, len(classes) + 1))
        return row

    return loop.run(run_epoch, has_val=len(va.labels) > 0)

