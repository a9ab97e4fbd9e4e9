"""One training epoch and one evaluation pass, for any classifier in the registry."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrscreen.runs.run_dir import CHECKPOINT_FILE, HISTORY_FILE, read_config, save_weights, write_config
from cxrscreen.training.config import HISTORY_COLUMNS, TrainConfig


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    deadline: Callable[[], bool] | None = None,
    keep_eval: Iterable[nn.Module] = (),
) -> tuple[float, int]:
    """Train over `loader` once. Returns (mean loss per image, images seen).

    deadline: called after each batch; when it returns True the epoch stops early (time budgets).
    keep_eval: modules that stay in eval mode (frozen parts: their BatchNorm statistics do not move).
    """
    model.train()
    for m in keep_eval:
        m.eval()
    total, seen = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(y)
        seen += len(y)
        if on_batch is not None:
            on_batch(len(y))
        if deadline is not None and deadline():
            break
    return total / max(seen, 1), seen


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) of every batch, in loader order."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    *,
    device: torch.device,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean loss, probabilities (N, C) and labels (N,) on a loader (no gradient, eval mode)."""
    logits, labels = predict_logits(model, loader, device=device)
    if len(labels) == 0:
        return float("nan"), logits, labels
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels)
    loss = float(criterion(t_logits, t_labels))
    return loss, torch.softmax(t_logits, 1).numpy(), labels


def monitor_score(row: dict[str, Any], monitor: str) -> float:
    """Higher is better: minus the loss for loss monitors, the figure itself otherwise."""
    value = float(row.get(monitor) or 0.0)
    return -value if monitor.endswith("loss") else value


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
            self._write_history()
            score = monitor_score(row, cfg.monitor)
            if not has_val or self.best is None or score > self.best:
                self.best, self.bad_epochs = score, 0
                sha = save_weights(self.model, self.out_dir)
                write_config(self.out_dir, {**read_config(self.out_dir), "weights_sha256": sha, "best_epoch": epoch})
            else:
                self.bad_epochs += 1
            extra = f", val mAP@0.5 {row['val_map50'] or 0:.3f}" if "val_map50" in row else ""
            self.log(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                     f"val acc {row.get('val_accuracy', float('nan')):.3f}, "
                     f"val macro-F1 {row.get('val_macro_f1', 0):.3f}{extra} ({row['seconds']} s)")
            torch.save(
                {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                 "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
                 "best": self.best, "bad_epochs": self.bad_epochs, "extra": self.extra},
                self.ckpt_path,
            )
            if self.bad_epochs >= cfg.patience:
                stop_reason = f"early stop: {cfg.monitor} did not improve for {cfg.patience} epochs"
                break
            if out_of_time is not None and out_of_time():
                stop_reason = f"time budget of {cfg.budget_minutes} min reached"
                break
        final = read_config(self.out_dir)
        final.update({"finished": True, "stop_reason": stop_reason,
                      "train_seconds": round(time.monotonic() - t_start, 1) + float(final.get("train_seconds", 0))})
        write_config(self.out_dir, final)
        self.log(f"{self.out_dir}: {stop_reason}; best epoch {final.get('best_epoch')}")
        (self.out_dir / "train_summary.json").write_text(
            json.dumps({"stop_reason": stop_reason, "epochs_run": len(self.history)}, indent=2))
        return final

