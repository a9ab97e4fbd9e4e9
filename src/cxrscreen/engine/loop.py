"""The one training loop: a train-one-epoch over any task's batches, and the epoch loop around it.

A task hands the loop a `Recipe` (model, optimiser, training batches, how a batch gives its loss, how an
epoch is validated); `EpochLoop` runs the epochs for every recipe in the package (classifier, detector,
source probe, lung localizer): history, best-epoch weights, checkpoint and resume when it has a run
directory, the best weights in memory when it has none, early stopping and the time budget in both.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cxrscreen.engine.distributed import DistContext
from cxrscreen.runs.run_dir import CHECKPOINT_FILE, HISTORY_FILE, read_config, save_weights, write_config

HISTORY_COLUMNS = [
    "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1",
    "val_covid_sensitivity", "val_covid_specificity", "val_worst_source_loss", "val_worst_source_accuracy",
    "stage", "lr", "seconds", "train_images",
]

BatchLoss = Callable[[nn.Module, Any, torch.device], tuple[torch.Tensor, int]]


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    batch_loss: BatchLoss,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    lr_at: Callable[[int], float] | None = None,
    step: int = 0,
    on_batch: Callable[[int], None] | None = None,
    deadline: Callable[[], bool] | None = None,
    keep_eval: Iterable[nn.Module] = (),
) -> tuple[float, int, int]:
    """Train over `loader` once. Returns (mean loss per image, images seen, global step after the epoch).

    batch_loss(model, batch, device) -> (mean loss of the batch, images in it): the task's forward pass.
    lr_at(step): learning rate set before each iteration (global step counter `step` onwards), if given.
    deadline: called after each batch; when it returns True the epoch stops early (time budgets).
    keep_eval: modules that stay in eval mode (frozen parts: their BatchNorm statistics do not move).
    """
    model.train()
    for m in keep_eval:
        m.eval()
    total, seen = 0.0, 0
    for batch in loader:
        if lr_at is not None:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
        loss, n = batch_loss(model, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        total += float(loss.detach()) * n
        seen += n
        if on_batch is not None:
            on_batch(n)
        if deadline is not None and deadline():
            break
    return total / max(seen, 1), seen, step


def monitor_score(row: dict[str, Any], monitor: str) -> float:
    """Higher is better: minus the loss for loss monitors, the figure itself otherwise."""
    value = float(row.get(monitor) or 0.0)
    return -value if monitor.endswith("loss") else value


class LoopSettings(Protocol):
    """The fields of a training config the loop reads (TrainConfig has them)."""

    epochs: int
    patience: int
    monitor: str
    budget_minutes: float | None


@dataclass
class Recipe:
    """What a task hands the loop for one training run.

    batch_loss(model, batch, device) -> (loss, images); validate() -> the epoch's val_loss and val_*
    figures (an empty dict when there is nothing to validate on); begin_epoch(epoch) -> (stage name,
    modules kept in eval mode); lr_at(step, epoch) -> the learning rate of each iteration (else the
    scheduler, stepped once per epoch, sets it). `config` holds the task's own config.json fields.
    `train_model`: what the training steps call when it is not `model` itself (DistributedDataParallel
    around it); `model` is what is saved, validated and frozen.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: Iterable[Any]
    batch_loss: BatchLoss
    validate: Callable[[], dict[str, Any]]
    images_per_epoch: int
    scheduler: Any | None = None
    lr_at: Callable[[int, int], float] | None = None
    begin_epoch: Callable[[int], tuple[str, list[nn.Module]]] | None = None
    history_columns: list[str] = field(default_factory=lambda: list(HISTORY_COLUMNS))
    config: dict[str, Any] = field(default_factory=dict)
    train_model: nn.Module | None = None


@dataclass
class EpochLoop:
    """The epoch loop every recipe shares.

    After each epoch the row goes to the history; the weights are kept when `cfg.monitor` improves (every
    epoch when there is no validation); then early stopping and the time budget. With `out_dir`, the
    history goes to history.csv, kept weights to model.safetensors (sha256 and best epoch in config.json),
    and checkpoint.pt gets model, optimiser, scheduler, RNG state, loop state and `extra` (the global
    step); `resume` restores all of it. Without `out_dir` (probes, the localizer's folds) the best weights
    are kept in memory and loaded back into the model at the end. In a distributed run (`ddp`, see
    `engine.distributed`) the train loss is reduced over the processes, the time budget is rank 0's, and
    only rank 0 writes; the others wait for it at the end.
    """

    cfg: LoopSettings
    recipe: Recipe
    generator: torch.Generator
    device: torch.device
    out_dir: Path | None = None
    has_val: bool = True
    name: str = ""
    log: Callable[[str], None] = print
    progress: Callable[[str, int], Any] | None = None
    start_epoch: int = 1
    best: float | None = None
    bad_epochs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    ddp: DistContext = field(default_factory=DistContext)

    @property
    def writes(self) -> bool:
        return self.out_dir is not None and self.ddp.is_main

    @property
    def ckpt_path(self) -> Path:
        if self.out_dir is None:
            raise ValueError("a loop without a run directory has no checkpoint")
        return self.out_dir / CHECKPOINT_FILE

    def resume(self) -> None:
        """Read history.csv and, when checkpoint.pt exists, restore the state saved after its epoch."""
        if self.out_dir is None:
            return
        path = self.out_dir / HISTORY_FILE
        if path.is_file():
            with open(path, newline="") as f:
                self.history = list(csv.DictReader(f))
        if not self.ckpt_path.is_file():
            self.history = []  # killed before its first checkpoint: the epoch is trained again, not listed twice
            return
        ck = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        r = self.recipe
        r.model.load_state_dict(ck["model"])
        r.optimizer.load_state_dict(ck["optimizer"])
        if r.scheduler is not None:
            r.scheduler.load_state_dict(ck["scheduler"])
        self.generator.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        self.start_epoch, self.best, self.bad_epochs = ck["epoch"] + 1, ck["best"], ck["bad_epochs"]
        self.extra = dict(ck.get("extra") or ({"step": ck["step"]} if "step" in ck else {}))  # older checkpoints
        self.history = self.history[: ck["epoch"]]
        self.log(f"resuming {self.out_dir} after epoch {ck['epoch']}")

    def _earlier_seconds(self) -> float:
        """Wall seconds of the epochs restored from earlier sittings (their history rows)."""
        done = self.history[: self.start_epoch - 1]
        return sum(float(r["seconds"]) for r in done if r.get("seconds") not in (None, ""))

    def _write_history(self) -> None:
        assert self.out_dir is not None
        cols = self.recipe.history_columns
        with open(self.out_dir / HISTORY_FILE, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in self.history:
                w.writerow({k: r.get(k, "") for k in cols})

    def _keep(self, epoch: int) -> None:
        if self.out_dir is None:
            self.best_state = {k: v.detach().clone() for k, v in self.recipe.model.state_dict().items()}
            return
        if not self.ddp.is_main:
            return
        sha = save_weights(self.recipe.model, self.out_dir)
        write_config(self.out_dir, {**read_config(self.out_dir), "weights_sha256": sha, "best_epoch": epoch})

    def _checkpoint(self, epoch: int) -> None:
        r = self.recipe
        torch.save(
            {"model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(),
             "scheduler": None if r.scheduler is None else r.scheduler.state_dict(),
             "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
             "best": self.best, "bad_epochs": self.bad_epochs, "extra": self.extra},
            tmp := self.ckpt_path.with_suffix(".pt.tmp"),
        )
        os.replace(tmp, self.ckpt_path)  # a run killed while saving keeps the previous checkpoint

    def _train_epoch(self, epoch: int, out_of_time: Callable[[], bool] | None) -> dict[str, Any]:
        r = self.recipe
        stage, keep_eval = r.begin_epoch(epoch) if r.begin_epoch is not None else ("train", [])
        bar = self.progress(f"epoch {epoch}/{self.cfg.epochs}", r.images_per_epoch) if self.progress else None
        lr_at = (lambda s: r.lr_at(s, epoch)) if r.lr_at is not None else None
        train_loss, seen, self.extra["step"] = train_one_epoch(
            r.train_model or r.model, r.train_loader, r.batch_loss, r.optimizer, device=self.device, lr_at=lr_at,
            step=self.extra.get("step", 0), on_batch=bar.update if bar else None,
            deadline=self.ddp.agreed(out_of_time), keep_eval=keep_eval)
        train_loss, seen = self.ddp.mean_loss(train_loss, seen)
        if bar:
            bar.close()
        row: dict[str, Any] = {"train_loss": train_loss, "lr": r.optimizer.param_groups[-1]["lr"],
                               "train_images": seen, "stage": stage}
        row.update(r.validate())
        if r.scheduler is not None:
            r.scheduler.step()
        return row

    def _log_epoch(self, row: dict[str, Any]) -> None:
        figures = [f"train loss {row['train_loss']:.4f}"]
        if "val_loss" in row:
            figures.append(f"val loss {row['val_loss']:.4f}")
        for key, label in (("val_accuracy", "val acc"), ("val_macro_f1", "val macro-F1"),
                           ("val_map50", "val mAP@0.5")):
            if row.get(key) is not None:
                figures.append(f"{label} {row[key]:.3f}")
        self.log(f"{self.name}epoch {row['epoch']}: {', '.join(figures)} ({row['seconds']} s)")

    def run(self) -> dict[str, Any]:
        """Run the remaining epochs. Returns the final config dict (also written to config.json) with a run
        directory, else {"stop_reason", "epochs_run", "history"} with the best weights loaded."""
        cfg = self.cfg
        t_start = time.monotonic()
        deadline_s = cfg.budget_minutes * 60 if cfg.budget_minutes else None
        out_of_time = (lambda: time.monotonic() - t_start > deadline_s) if deadline_s else None
        stop_reason = "completed all epochs"
        earlier = self._earlier_seconds()
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            t0 = time.monotonic()
            row = {"epoch": epoch, **self._train_epoch(epoch, out_of_time)}
            row["seconds"] = round(time.monotonic() - t0, 1)
            self.history.append(row)
            if self.writes:
                self._write_history()
            score = monitor_score(row, cfg.monitor)
            if not self.has_val or self.best is None or score > self.best:
                self.best, self.bad_epochs = score, 0
                self._keep(epoch)
            else:
                self.bad_epochs += 1
            self._log_epoch(row)
            if self.writes:
                self._checkpoint(epoch)
            if self.bad_epochs >= cfg.patience:
                stop_reason = f"early stop: {cfg.monitor} did not improve for {cfg.patience} epochs"
                break
            if out_of_time is not None and out_of_time():
                stop_reason = f"time budget of {cfg.budget_minutes} min reached"
                break
        seconds = round(time.monotonic() - t_start, 1)
        if self.out_dir is None:
            if self.best_state is not None:
                self.recipe.model.load_state_dict(self.best_state)
            self.log(f"{self.name}{stop_reason} after epoch {len(self.history)} ({seconds:.0f} s)")
            return {"stop_reason": stop_reason, "epochs_run": len(self.history), "history": self.history,
                    "train_seconds": seconds}
        if self.ddp.is_main:
            final = read_config(self.out_dir)
            final.update({"finished": True, "stop_reason": stop_reason,
                          "train_seconds": round(seconds + earlier, 1)})  # over every sitting
            write_config(self.out_dir, final)
            (self.out_dir / "train_summary.json").write_text(
                json.dumps({"stop_reason": stop_reason, "epochs_run": len(self.history)}, indent=2))
        self.ddp.barrier()  # the other processes read back what rank 0 wrote
        final = read_config(self.out_dir)
        self.log(f"{self.out_dir}: {stop_reason}; best epoch {final.get('best_epoch')}")
        return final
