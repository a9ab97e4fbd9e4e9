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

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler

from cxrscreen import CLASSES
from cxrscreen.data.dataset import PreprocessedCache, default_cache_dir
from cxrscreen.data.splits import read_split
from cxrscreen.errors import CXRError
from cxrscreen.localizer import BoxSource, geometry_for, image_sizes, size_of
from cxrscreen.models.detection import (
    IMAGE_RULE,
    DetectionAugment,
    DetectionDataset,
    boxes_to_model,
    check_input_size,
    collate,
    create_detector,
    evaluate,
    image_probabilities,
    lr_factor,
    mean_average_precision,
    train_one_epoch,
)
from cxrscreen.models.registry import count_parameters, get_spec
from cxrscreen.runs import CHECKPOINT_FILE, HISTORY_FILE, read_config, save_weights, write_config
from cxrscreen.training import (
    HISTORY_COLUMNS,
    SubsetData,
    TrainConfig,
    _history_rows,
    _val_figures,
    load_subset,
    pick_device,
    run_base_config,
    seed_everything,
)
from cxrscreen.transforms import PreprocessConfig

BOXES_FILE = "boxes.csv"
DET_HISTORY_COLUMNS = [*HISTORY_COLUMNS, "val_map50"]


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=DET_HISTORY_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in DET_HISTORY_COLUMNS})


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
    ckpt_path = out_dir / CHECKPOINT_FILE
    if (out_dir / "config.json").is_file():
        old = read_config(out_dir)
        if TrainConfig.from_dict(old.get("training") or {}).to_dict() != cfg.to_dict():
            raise CXRError("run directory holds a run with another configuration; choose a new --out", out_dir)
        if old.get("finished"):
            log(f"{out_dir}: finished run found, not training again")
            return old
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    classes = list(CLASSES)
    cache = PreprocessedCache(cfg.preprocess, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())

    def bar(desc: str, total: int) -> Any:
        return progress_factory(desc, total) if progress_factory else None

    subsets: dict[str, SubsetData] = {}
    split_df = read_split(split_csv)
    for name in ("train", "val"):
        b = bar(f"loading {name} images", int((split_df["subset"] == name).sum()))
        subsets[name] = load_subset(data_dir, split_csv, name, cache, classes, b.update if b else None)
        if b:
            b.close()
        for p, e in subsets[name].errors.items():
            log(f"skipped {p}: {e}")
    tr, va = subsets["train"], subsets["val"]
    if len(tr.labels) == 0:
        raise CXRError("the split has no usable train images", split_csv)

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
    n_per_epoch = min(cfg.max_train_images_per_epoch or len(train_ds), len(train_ds))
    if cfg.balance == "sampler":
        w = 1.0 / np.bincount(tr.labels, minlength=len(classes))[tr.labels]
        sampler: Any = WeightedRandomSampler(w.tolist(), n_per_epoch, replacement=True, generator=generator)
    else:
        sampler = RandomSampler(train_ds, num_samples=n_per_epoch, generator=generator)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                              collate_fn=collate, drop_last=n_per_epoch > cfg.batch_size)
    val_loader = DataLoader(DetectionDataset(va.images, va_boxes, va_lbls), batch_size=cfg.batch_size,
                            collate_fn=collate)
    warmup = min(len(train_loader), 500)

    start_epoch, best, bad_epochs, step = 1, None, 0, 0
    history = _history_rows(out_dir / HISTORY_FILE)
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        generator.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        start_epoch, best, bad_epochs, step = ck["epoch"] + 1, ck["best"], ck["bad_epochs"], ck["step"]
        history = history[: ck["epoch"]]
        log(f"resuming {out_dir} after epoch {ck['epoch']}")

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
    write_config(out_dir, {**read_config(out_dir), **base_config} if ckpt_path.is_file() else base_config)

    val_truths = [(b, lb) for b, lb in zip(va_boxes, va_lbls, strict=True)]
    t_start = time.monotonic()
    deadline_s = cfg.budget_minutes * 60 if cfg.budget_minutes else None
    stop_reason = "completed all epochs"
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.monotonic()
        b = bar(f"epoch {epoch}/{cfg.epochs}", n_per_epoch)
        out_of_time = (lambda: time.monotonic() - t_start > deadline_s) if deadline_s else None

        def lr_at(s: int, e: int = epoch) -> float:
            return cfg.lr * lr_factor(s, e, epochs=cfg.epochs, warmup_steps=warmup)

        train_loss, seen, step = train_one_epoch(model, train_loader, optimizer, device=device, lr_at=lr_at,
                                                 step=step, on_batch=b.update if b else None, deadline=out_of_time)
        if b:
            b.close()
        val_loss, dets = evaluate(model, val_loader, device=device)
        row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.monotonic() - t0, 1),
                               "train_images": seen}
        if len(va.labels):
            row.update(_val_figures(image_probabilities(dets, len(classes)), va.labels, classes))
            row["val_map50"] = mean_average_precision(dets, val_truths, range(1, len(classes) + 1))
        history.append(row)
        _write_history(out_dir / HISTORY_FILE, history)
        score = -val_loss if cfg.monitor == "val_loss" else row.get("val_macro_f1", 0.0)
        if len(va.labels) == 0 or best is None or score > best:
            best, bad_epochs = score, 0
            sha = save_weights(model, out_dir)
            write_config(out_dir, {**read_config(out_dir), "weights_sha256": sha, "best_epoch": epoch})
        else:
            bad_epochs += 1
        log(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
            f"val acc {row.get('val_accuracy', float('nan')):.3f}, val macro-F1 {row.get('val_macro_f1', 0):.3f}, "
            f"val mAP@0.5 {row.get('val_map50') or 0:.3f} ({row['seconds']} s)")
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
             "torch_rng": torch.get_rng_state(), "epoch": epoch, "best": best, "bad_epochs": bad_epochs,
             "step": step},
            ckpt_path,
        )
        if bad_epochs >= cfg.patience:
            stop_reason = f"early stop: {cfg.monitor} did not improve for {cfg.patience} epochs"
            break
        if deadline_s and time.monotonic() - t_start > deadline_s:
            stop_reason = f"time budget of {cfg.budget_minutes} min reached"
            break
    final = read_config(out_dir)
    final.update({"finished": True, "stop_reason": stop_reason,
                  "train_seconds": round(time.monotonic() - t_start, 1) + float(final.get("train_seconds", 0))})
    write_config(out_dir, final)
    log(f"{out_dir}: {stop_reason}; best epoch {final.get('best_epoch')}")
    (out_dir / "train_summary.json").write_text(json.dumps({"stop_reason": stop_reason,
                                                            "epochs_run": len(history)}, indent=2))
    return final
