"""Linear probing, then fine-tuning: which parameters learn in which epoch of a classifier run."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cxrscreen.errors import CXRError
from cxrscreen.training.config import TrainConfig


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

