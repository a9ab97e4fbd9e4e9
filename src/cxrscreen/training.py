"""The classifier training recipe: data from a manifest + split, the loop, early stopping, resume.

`train(TrainConfig(...), data_dir, split_csv, out_dir)` writes a run directory (see `runs.py`).
A checkpoint is written after every epoch; calling `train` again on the same directory with the
same configuration continues from it, and a finished run is not trained again.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from cxrscreen import CLASSES, distributed
from cxrscreen.data.dataset import PreprocessedCache, XRayTensorDataset, default_cache_dir, load_images
from cxrscreen.data.manifest import file_sha256, manifest_root, read_manifest, resolve_image_paths
from cxrscreen.data.splits import read_split
from cxrscreen.engine import class_weights, train_one_epoch
from cxrscreen.errors import CXRError
from cxrscreen.metrics import binary_rates
from cxrscreen.models.registry import count_parameters, create_model, get_spec
from cxrscreen.runs import (
    CHECKPOINT_FILE,
    HISTORY_FILE,
    package_versions,
    read_config,
    save_weights,
    write_config,
)
from cxrscreen.transforms import AugmentConfig, PreprocessConfig, eval_transform, train_transform

HISTORY_COLUMNS = [
    "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1",
    "val_covid_sensitivity", "val_covid_specificity", "val_worst_source_loss", "val_worst_source_accuracy",
    "stage", "lr", "seconds", "train_images",
]


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in config.json under "training")."""

    arch: str = "resnet18"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    weights: str = "none"
    seed: int = 0
    balance: str = "loss"  # "loss": class-weighted cross-entropy; "sampler": balanced sampling; "none"
    label_smoothing: float = 0.0
    patience: int = 5
    monitor: str = "val_loss"  # or "val_macro_f1", or "val_worst_source_loss" (the highest per-source val loss)
    linear_probe_epochs: int = 0  # first epochs train the head only (backbone frozen, in eval mode)
    linear_probe_lr: float | None = None  # the head's learning rate in those epochs (default: lr)
    backbone_lr_scale: float = 1.0  # after them, the backbone learns at lr * this, the head at lr
    frozen: list[str] = field(default_factory=list)  # parameter-name prefixes that never train ("blocks.0")
    max_train_images_per_epoch: int | None = None
    budget_minutes: float | None = None
    threads: int | None = None
    num_workers: int = 0
    device: str = "auto"
    cache_dir: str | None = None
    boxes: str | None = None  # detectors: lung boxes CSV (`cxrscreen localize label`); default <out>/boxes.csv
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (tuples become lists), as stored in config.json."""
        d = dataclasses.asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise CXRError(f"unknown training options: {', '.join(sorted(unknown))}")
        if isinstance(d.get("preprocess"), dict):
            d["preprocess"] = PreprocessConfig.from_dict(d["preprocess"])
        if isinstance(d.get("augment"), dict):
            aug = dict(d["augment"])
            if "scale" in aug:
                aug["scale"] = tuple(aug["scale"])
            d["augment"] = AugmentConfig(**aug)
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> TrainConfig:
        """Load a YAML recipe; non-None overrides (from the command line) win."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CXRError(f"cannot read training config ({exc})", path) from exc
        data = data.get("train", data)
        pre = dict(data.get("preprocess") or {})
        for k in ("image_size",):
            if overrides.get(k) is not None:
                pre[k] = overrides.pop(k)
        overrides.pop("image_size", None)
        data["preprocess"] = pre
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_run(cfg: TrainConfig) -> tuple[torch.device, PreprocessedCache]:
    """Before a run: torch threads, every seed, the device and the preprocessed-image cache of cfg."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    cache = PreprocessedCache(cfg.preprocess, Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    return pick_device(cfg.device), cache


@dataclass
class SubsetData:
    """One subset's images in memory with labels, groups and sources, aligned."""

    images: np.ndarray
    labels: np.ndarray
    groups: list[str]
    sources: list[str]
    paths: list[str]
    errors: dict[str, str]


def load_subset(
    data_dir: Path,
    split_csv: Path | None,
    subset: str | None,
    cache: PreprocessedCache,
    classes: list[str],
    progress: Callable[[int], None] | None = None,
) -> SubsetData:
    """Images of one subset of a split (or all images of the manifest when split_csv is None)."""
    df = read_manifest(data_dir)
    if split_csv is not None:
        split = read_split(split_csv)
        unknown = set(split["image"]) - set(df["image"])
        if unknown:
            raise CXRError(f"{len(unknown)} split rows name images not in the manifest, e.g. {sorted(unknown)[0]}",
                           split_csv)
        keep = set(split.loc[split["subset"] == subset, "image"])
        df = df[df["image"].isin(keep)].reset_index(drop=True)
    paths = resolve_image_paths(df, manifest_root(data_dir))
    loaded = load_images(paths, cache, progress=progress)
    sub = df.iloc[loaded.kept].reset_index(drop=True)
    labels = np.array([classes.index(lbl) for lbl in sub["label"]], dtype=np.int64)
    return SubsetData(
        images=loaded.images,
        labels=labels,
        groups=list(sub["split_group"]),
        sources=list(sub["source"]),
        paths=[str(paths[i]) for i in loaded.kept],
        errors=loaded.errors,
    )


def load_train_val(
    data_dir: Path,
    split_csv: Path,
    cache: PreprocessedCache,
    classes: list[str],
    *,
    bar: Callable[[str, int], Any],
    log: Callable[[str], None],
) -> tuple[SubsetData, SubsetData]:
    """The train and val subsets of a split, with a progress bar each; unreadable files are logged and
    skipped. CXRError when no train image is left."""
    split_df = read_split(split_csv)
    subsets = {}
    for name in ("train", "val"):
        b = bar(f"loading {name} images", int((split_df["subset"] == name).sum()))
        subsets[name] = load_subset(data_dir, split_csv, name, cache, classes, b.update if b else None)
        if b:
            b.close()
        for p, e in subsets[name].errors.items():
            log(f"skipped {p}: {e}")
    if len(subsets["train"].labels) == 0:
        raise CXRError("the split has no usable train images", split_csv)
    return subsets["train"], subsets["val"]


def epoch_sampler(cfg: TrainConfig, labels: np.ndarray, n_classes: int, generator: torch.Generator) -> Sampler[int]:
    """The images one epoch draws: min(cfg.max_train_images_per_epoch, all) of them, classes drawn evenly
    (with replacement) when cfg.balance is "sampler", else a random order without replacement."""
    n = min(cfg.max_train_images_per_epoch or len(labels), len(labels))
    if cfg.balance == "sampler":
        w = 1.0 / np.bincount(labels, minlength=n_classes)[labels]
        return WeightedRandomSampler(w.tolist(), n, replacement=True, generator=generator)
    return RandomSampler(range(len(labels)), num_samples=n, generator=generator)


def val_figures(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """Validation accuracy, macro-F1 and COVID sensitivity / specificity of arg-max predictions."""
    from sklearn.metrics import f1_score

    pred = probs.argmax(1)
    covid = classes.index("covid")
    sens, spec = binary_rates(labels == covid, pred == covid)
    return {
        "val_accuracy": float((pred == labels).mean()),
        "val_macro_f1": float(f1_score(labels, pred, labels=list(range(len(classes))), average="macro",
                                       zero_division=0)),
        "val_covid_sensitivity": sens,
        "val_covid_specificity": spec,
    }


def per_source_val(
    probs: np.ndarray, labels: np.ndarray, sources: list[str], weight: torch.Tensor | None
) -> dict[str, float]:
    """The worst source on validation: the highest mean cross-entropy and the lowest arg-max accuracy
    over the sources of the val images (what a checkpoint is chosen by when generalisation matters)."""
    src = np.asarray(sources)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))
    if weight is not None:
        nll = nll * weight.numpy()[labels]
    pred = probs.argmax(1)
    groups = [src == s for s in sorted(set(sources))]
    return {
        "val_worst_source_loss": float(max(nll[m].mean() for m in groups)),
        "val_worst_source_accuracy": float(min((pred[m] == labels[m]).mean() for m in groups)),
    }


def monitor_score(row: dict[str, Any], monitor: str) -> float:
    """Higher is better: minus the loss for loss monitors, the figure itself otherwise."""
    value = float(row.get(monitor) or 0.0)
    return -value if monitor.endswith("loss") else value


class Stages:
    """Linear probing, then fine-tuning (Kumar et al., ICLR 2022): which parameters learn in which epoch.

    Parameters under `cfg.frozen` prefixes never learn; in the first `cfg.linear_probe_epochs` epochs only the
    head (`head` attribute path) learns, at `cfg.linear_probe_lr`; after them the backbone learns at
    `cfg.lr * cfg.backbone_lr_scale` and the head at `cfg.lr`, both on one cosine schedule.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, head: str) -> None:
        self.cfg = cfg
        self.model = model
        named = list(model.named_parameters())
        self.never = [p for n, p in named if any(n.startswith(f) for f in cfg.frozen)]
        never_ids = {id(p) for p in self.never}
        self.head = [p for n, p in named if n.startswith(head + ".") and id(p) not in never_ids]
        head_ids = {id(p) for p in self.head}
        self.backbone = [p for _, p in named if id(p) not in head_ids | never_ids]
        if not self.head:
            raise CXRError(f"{cfg.arch}: no trainable parameters under its head {head!r}")
        self.frozen_modules = [m for n, m in model.named_modules()
                               if n and any(n == f or n.startswith(f + ".") for f in cfg.frozen)]
        for p in self.never:
            p.requires_grad_(False)

    def optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": self.backbone, "lr": self.cfg.lr * self.cfg.backbone_lr_scale},
                  {"params": self.head, "lr": self.cfg.lr}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.cfg.lr,
                                 weight_decay=self.cfg.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Per-epoch factors: the probe's lr ratio in the probe epochs, then cosine over the rest."""
        lp, total = self.cfg.linear_probe_epochs, max(self.cfg.epochs, 1)
        probe = (self.cfg.linear_probe_lr or self.cfg.lr) / self.cfg.lr
        rest = max(total - lp, 1)

        def factor(e: int) -> float:  # e: epochs done so far (0 before the first)
            return probe if e < lp else 0.5 * (1 + np.cos(np.pi * min(e - lp, rest) / rest))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def begin_epoch(self, epoch: int) -> tuple[str, list[nn.Module]]:
        """Set requires_grad for `epoch` (1-based); returns its stage name and the modules kept in eval mode."""
        probing = epoch <= self.cfg.linear_probe_epochs
        for p in self.backbone:
            p.requires_grad_(not probing)
        if probing:  # the whole network in eval mode: the head is the only thing that learns
            return "linear_probe", [self.model]
        return "fine_tune", self.frozen_modules


def stored_run(cfg: TrainConfig, out_dir: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The config of a finished run of `cfg` in out_dir, or None when there is none (or it is unfinished).

    A run directory that holds a run of another configuration is refused (CXRError). Stored training
    options are read through TrainConfig, so a field added since the run was made takes its default.
    """
    if not (out_dir / "config.json").is_file():
        return None
    old = read_config(out_dir)
    if TrainConfig.from_dict(old.get("training") or {}).to_dict() != cfg.to_dict():
        raise CXRError("run directory holds a run with another configuration; choose a new --out", out_dir)
    if old.get("finished"):
        log(f"{out_dir}: finished run found, not training again")
        return old
    return None


@dataclass
class EpochLoop:
    """The epoch loop every recipe shares, around a recipe's own `run_epoch`.

    After each epoch: the row goes to history.csv, the weights are saved when `cfg.monitor` improves,
    checkpoint.pt gets model, optimiser, scheduler, RNG state, loop state and `extra` (recipe state such as
    the step count); then early stopping and the time budget. `resume` restores all of it from checkpoint.pt.
    """

    cfg: TrainConfig
    out_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    scheduler: Any | None = None
    history_columns: list[str] = field(default_factory=lambda: list(HISTORY_COLUMNS))
    log: Callable[[str], None] = print
    start_epoch: int = 1
    best: float | None = None
    bad_epochs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    writer: bool = True  # False on the processes of a distributed run other than rank 0: they write nothing
    sync: Callable[[], None] = lambda: None  # waits for every process (distributed runs: a barrier)

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    def resume(self, device: torch.device) -> None:
        """Read history.csv and, when checkpoint.pt exists, restore the state saved after its epoch."""
        path = self.out_dir / HISTORY_FILE
        if path.is_file():
            with open(path, newline="") as f:
                self.history = list(csv.DictReader(f))
        if not self.ckpt_path.is_file():
            return
        ck = torch.load(self.ckpt_path, map_location=device, weights_only=False)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(ck["scheduler"])
        self.generator.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        self.start_epoch, self.best, self.bad_epochs = ck["epoch"] + 1, ck["best"], ck["bad_epochs"]
        self.extra = dict(ck.get("extra") or ({"step": ck["step"]} if "step" in ck else {}))  # older checkpoints
        self.history = self.history[: ck["epoch"]]
        self.log(f"resuming {self.out_dir} after epoch {ck['epoch']}")

    def _write_history(self) -> None:
        with open(self.out_dir / HISTORY_FILE, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.history_columns)
            w.writeheader()
            for r in self.history:
                w.writerow({k: r.get(k, "") for k in self.history_columns})

    def run(
        self,
        run_epoch: Callable[[int, Callable[[], bool] | None], dict[str, Any]],
        *,
        has_val: bool,
    ) -> dict[str, Any]:
        """Run the remaining epochs; returns the final config dict (also written to config.json).

        run_epoch(epoch, out_of_time) trains one epoch (stopping early when out_of_time() is true),
        validates, and returns the history row: train_loss, val_loss, lr, train_images and val_* figures.
        Without validation images (has_val False) every epoch's weights are kept.
        """
        cfg = self.cfg
        t_start = time.monotonic()
        deadline_s = cfg.budget_minutes * 60 if cfg.budget_minutes else None
        out_of_time = (lambda: time.monotonic() - t_start > deadline_s) if deadline_s else None
        stop_reason = "completed all epochs"
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            t0 = time.monotonic()
            row = {"epoch": epoch, **run_epoch(epoch, out_of_time)}
            row["seconds"] = round(time.monotonic() - t0, 1)
            self.history.append(row)
            if self.writer:
                self._write_history()
            score = monitor_score(row, cfg.monitor)
            if not has_val or self.best is None or score > self.best:
                self.best, self.bad_epochs = score, 0
                if self.writer:
                    sha = save_weights(self.model, self.out_dir)
                    write_config(self.out_dir, {**read_config(self.out_dir), "weights_sha256": sha,
                                                "best_epoch": epoch})
            else:
                self.bad_epochs += 1
            extra = f", val mAP@0.5 {row['val_map50'] or 0:.3f}" if "val_map50" in row else ""
            self.log(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                     f"val acc {row.get('val_accuracy', float('nan')):.3f}, "
                     f"val macro-F1 {row.get('val_macro_f1', 0):.3f}{extra} ({row['seconds']} s)")
            if self.writer:
                torch.save(
                    {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                     "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
                     "best": self.best, "bad_epochs": self.bad_epochs, "extra": self.extra},
                    tmp := self.ckpt_path.with_suffix(".pt.tmp"),
                )
                os.replace(tmp, self.ckpt_path)  # a run killed while saving keeps the previous checkpoint
            if self.bad_epochs >= cfg.patience:
                stop_reason = f"early stop: {cfg.monitor} did not improve for {cfg.patience} epochs"
                break
            if out_of_time is not None and out_of_time():
                stop_reason = f"time budget of {cfg.budget_minutes} min reached"
                break
        if self.writer:
            final = read_config(self.out_dir)
            final.update({"finished": True, "stop_reason": stop_reason, "train_seconds": round(
                time.monotonic() - t_start, 1) + float(final.get("train_seconds", 0))})
            write_config(self.out_dir, final)
            (self.out_dir / "train_summary.json").write_text(
                json.dumps({"stop_reason": stop_reason, "epochs_run": len(self.history)}, indent=2))
        self.sync()
        final = read_config(self.out_dir)
        self.log(f"{self.out_dir}: {stop_reason}; best epoch {final.get('best_epoch')}")
        return final


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
        if distributed.under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise CXRError(f"{cfg.arch} is a detector; distributed training is for classifiers (use one process)")
        from cxrscreen.detection_training import train_detector

        return train_detector(cfg, data_dir, split_csv, out_dir, log=log, progress_factory=progress_factory)
    if cfg.preprocess.image_size < spec.min_size:
        raise CXRError(f"{cfg.arch} needs image_size >= {spec.min_size}, got {cfg.preprocess.image_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ddp = distributed.context(cfg.device)  # torchrun: join the process group (one process: no-op)
    if not ddp.is_main:
        log, progress_factory = (lambda _msg: None), None  # rank 0 alone logs and shows progress
    if (old := stored_run(cfg, out_dir, log)) is not None:
        return old
    device, cache = setup_run(cfg)
    device = ddp.device(device)
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
    sampler = ddp.sampler(epoch_sampler(cfg, tr.labels, len(classes), generator))
    local_batch = ddp.local_batch(cfg.batch_size)
    train_loader = DataLoader(train_ds, batch_size=local_batch, sampler=sampler, num_workers=cfg.num_workers,
                              drop_last=len(train_ds) // ddp.world > local_batch)
    train_model = ddp.wrap(model, device, staged=cfg.linear_probe_epochs > 0)
    val_loader = DataLoader(XRayTensorDataset(va.images, va.labels, eval_transform(cfg.preprocess)),
                            batch_size=max(cfg.batch_size, 64))

    loop = EpochLoop(cfg, out_dir, model, optimizer, generator, scheduler, log=log, writer=ddp.is_main,
                     sync=ddp.barrier)
    loop.resume(device)
    ddp.check_same(loop.start_epoch, "the epoch to resume at")

    base_config: dict[str, Any] = {
        **run_base_config(cfg, "classifier", classes, data_dir, split_csv, tr, va),
        "parameters": count_parameters(model),
        "finished": False,
    }
    if ddp.enabled:
        base_config["distributed"] = ddp.info()
    if ddp.is_main:
        write_config(out_dir, {**read_config(out_dir), **base_config} if loop.ckpt_path.is_file() else base_config)
    ddp.barrier()

    def run_epoch(epoch: int, out_of_time: Callable[[], bool] | None) -> dict[str, Any]:
        stage, keep_eval = stages.begin_epoch(epoch) if stages is not None else ("train", [])
        b = bar(f"epoch {epoch}/{cfg.epochs}", len(train_loader) * local_batch)
        train_loss, seen = train_one_epoch(train_model, train_loader, criterion, optimizer, device=device,
                                           on_batch=b.update if b else None, deadline=ddp.agreed(out_of_time),
                                           keep_eval=keep_eval)
        train_loss, seen = ddp.mean_loss(train_loss, seen)
        if b:
            b.close()
        val_loss, probs, labels = ddp.evaluate_epoch(model, val_loader, val_criterion, device=device)
        row = {"train_loss": train_loss, "val_loss": val_loss, "lr": optimizer.param_groups[-1]["lr"],
               "train_images": seen, "stage": stage}
        scheduler.step()
        if not len(labels):
            return row
        return {**row, **val_figures(probs, labels, classes), **per_source_val(probs, labels, va.sources, weight)}

    return loop.run(run_epoch, has_val=len(va.labels) > 0)


if __name__ == "__main__":  # torchrun --nproc_per_node N -m cxrscreen.training --data ... (see distributed.py)
    distributed.main()
