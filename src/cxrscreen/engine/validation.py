"""A classifier's forward pass over a loader without gradients: logits, loss and probabilities.

Shared by the epoch loop, the distributed context (each process predicts a slice) and the source probe.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and labels (N,) of every batch, in loader order (eval mode)."""
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
    """Mean loss, probabilities (N, C) and labels (N,) of a classifier on a loader (no gradient, eval mode)."""
    logits, labels = predict_logits(model, loader, device=device)
    if len(labels) == 0:
        return float("nan"), logits, labels
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels)
    loss = float(criterion(t_logits, t_labels))
    return loss, torch.softmax(t_logits, 1).numpy(), labels
