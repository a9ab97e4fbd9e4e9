"""Training a classifier: cross-entropy, class weights or balanced sampling, staged fine-tuning, validation.

The recipe: class-weighted cross-entropy (or balanced sampling), AdamW with a cosine schedule, optionally
linear probing then fine-tuning (`training.stages.Stages`), the augmenting transform of the config,
validation once per epoch (loss, accuracy, macro-F1, COVID sensitivity / specificity, worst source).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cxrscreen.data.dataset import XRayTensorDataset
from cxrscreen.data.subsets import epoch_sampler
from cxrscreen.engine.distributed import DistContext
from cxrscreen.engine.loop import Recipe
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.metrics import binary_rates
from cxrscreen.models.registry import create_model, get_spec
from cxrscreen.training.stages import Stages
from cxrscreen.transforms.augment import eval_transform, train_transform

if TYPE_CHECKING:
    from cxrscreen.training.config import TrainConfig
    from cxrscreen.training.tasks import TrainContext

def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (absent classes get weight 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(w / w[w > 0].mean(), dtype=torch.float32)

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

def cross_entropy_batch(criterion: nn.Module):  # noqa: ANN201  (a BatchLoss)
    """The classifier's batch loss: (x, y) -> criterion(model(x), y)."""

    def batch_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
                   ) -> tuple[torch.Tensor, int]:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        return criterion(model(x), y), len(y)

    return batch_loss

def classifier_recipe(
    cfg: TrainConfig,
    model: nn.Module,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int,
    device: torch.device,
    generator: torch.Generator,
    classes: list[str] | None = None,
    val_sources: list[str] | None = None,
    head: str | None = None,
    ddp: DistContext | None = None,
) -> Recipe:
    """The classifier recipe on (images uint8 (N, S, S), labels (N,)) for train and val.

    classes: the label names; with "covid" among them validation also gives the val_* figures, and with
    val_sources the worst-source figures. head: the head's attribute path, for staged training (linear
    probe, frozen prefixes, a backbone learning-rate scale) when the config asks for it. ddp: in a
    distributed run each process trains on its share of the epoch with batch_size // world images a step
    (the config's batch stays the global one) through DistributedDataParallel, and validation is gathered.
    """
    ddp = ddp or DistContext()
    weight = class_weights(train[1], num_classes) if cfg.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device),
                                    label_smoothing=cfg.label_smoothing)
    val_criterion = nn.CrossEntropyLoss(weight=weight)
    staged = cfg.linear_probe_epochs > 0 or cfg.frozen or cfg.backbone_lr_scale != 1.0
    stages = Stages(cfg, model, head) if staged and head is not None else None
    if stages is not None:
        optimizer = stages.optimizer()
        scheduler = stages.scheduler(optimizer)
    else:  # the recipe of runs made before staged training existed, unchanged
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    train_ds = XRayTensorDataset(train[0], train[1], train_transform(cfg.preprocess, cfg.augment))
    sampler = ddp.sampler(epoch_sampler(cfg, train[1], num_classes, generator))
    local_batch = ddp.local_batch(cfg.batch_size)
    train_loader = DataLoader(train_ds, batch_size=local_batch, sampler=sampler, num_workers=cfg.num_workers,
                              drop_last=len(train_ds) // ddp.world > local_batch)
    val_loader = DataLoader(XRayTensorDataset(val[0], val[1], eval_transform(cfg.preprocess)),
                            batch_size=max(cfg.batch_size, 64))

    def validate() -> dict[str, Any]:
        val_loss, probs, labels = ddp.evaluate_epoch(model, val_loader, val_criterion, device=device)
        row: dict[str, Any] = {"val_loss": val_loss}
        if not len(labels) or classes is None or "covid" not in classes:
            return row
        row.update(val_figures(probs, labels, classes))
        if val_sources is not None:
            row.update(per_source_val(probs, labels, val_sources, weight))
        return row

    return Recipe(model=model, optimizer=optimizer, train_loader=train_loader,
                  batch_loss=cross_entropy_batch(criterion), validate=validate,
                  images_per_epoch=len(train_loader) * local_batch, scheduler=scheduler,
                  begin_epoch=stages.begin_epoch if stages is not None else None,
                  train_model=ddp.wrap(model, device, staged=cfg.linear_probe_epochs > 0) if ddp.enabled else None)


class ClassificationTraining:
    """Training of registry kind "classifier" (see the module docstring)."""

    kind = "classifier"

    def check_config(self, cfg: TrainConfig, out_dir: Path) -> None:
        spec = get_spec(cfg.arch)
        if cfg.preprocess.image_size < spec.min_size:
            raise CXRError(f"{cfg.arch} needs image_size >= {spec.min_size}, got {cfg.preprocess.image_size}")

    def recipe(self, ctx: TrainContext) -> Recipe:
        cfg = ctx.cfg
        model = create_model(cfg.arch, num_classes=len(ctx.classes), in_chans=1, weights=cfg.weights).to(ctx.device)
        return classifier_recipe(cfg, model, (ctx.train.images, ctx.train.labels), (ctx.val.images, ctx.val.labels),
                                 num_classes=len(ctx.classes), device=ctx.device, generator=ctx.generator,
                                 classes=ctx.classes, val_sources=ctx.val.sources, head=get_spec(cfg.arch).head,
                                 ddp=ctx.ddp)
