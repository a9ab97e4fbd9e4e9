"""One training epoch and one evaluation pass, for any classifier in the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn


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


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (absent classes get weight 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(w / w[w > 0].mean(), dtype=torch.float32)
