"""Training an SSD detector: the box dataset, batch loss, validation pass and recipe (kind "detector").

Inference (detections -> probabilities and boxes) is `tasks.detection`; this module adds what training needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from cxrscreen.data.lung_boxes import BoxSource, image_sizes, size_of
from cxrscreen.data.subsets import SubsetData, epoch_sampler
from cxrscreen.engine.loop import HISTORY_COLUMNS, Recipe
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.metrics import mean_average_precision
from cxrscreen.models.detectors import Detections, check_input_size, create_detector
from cxrscreen.tasks.detection import IMAGE_RULE, _as_numpy, image_probabilities, to_input
from cxrscreen.training.classification import val_figures
from cxrscreen.transforms.boxes import DetectionAugment, boxes_to_model
from cxrscreen.transforms.preprocess import PreprocessConfig, geometry_for

if TYPE_CHECKING:
    from cxrscreen.training.config import TrainConfig
    from cxrscreen.training.tasks import TrainContext

class DetectionDataset(torch.utils.data.Dataset):
    """In-memory squares with boxes: item -> (float (1, S, S) in [0, 1], {"boxes", "labels"}).

    images uint8 (N, S, S); boxes[i] (K_i, 4) model pixels; labels[i] (K_i,) detector labels (>= 1).
    augment: a ``DetectionAugment`` or None (no augmentation).
    """

    def __init__(
        self,
        images: np.ndarray,
        boxes: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        augment: DetectionAugment | None = None,
    ) -> None:
        if not len(images) == len(boxes) == len(labels):
            raise ValueError(f"{len(images)} images, {len(boxes)} box sets, {len(labels)} label sets")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.boxes = [torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4)) for b in boxes]
        self.labels = [torch.as_tensor(np.asarray(lb, np.int64).reshape(-1)) for lb in labels]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = self.images[i].unsqueeze(0)
        if self.augment is not None:
            return self.augment(img, self.boxes[i], self.labels[i])
        return to_input(img), {"boxes": self.boxes[i].clone(), "labels": self.labels[i].clone()}

def collate(batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> tuple[list, list]:
    """Detection batches stay lists (images, targets)."""
    return [b[0] for b in batch], [b[1] for b in batch]

def losses_and_detections(
    model: SSD, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], list[Detections]]:
    """SSD losses and detections from one forward pass, with the model as it is (call in eval mode).

    torchvision's SSD returns either losses (train mode) or detections (eval mode); validation needs
    both, and train mode would also move the BatchNorm statistics, so this runs its steps once itself.
    """
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    batch, targets = model.transform(images, targets)
    features = list(model.backbone(batch.tensors).values())
    head = model.head(features)
    anchors = model.anchor_generator(batch, features)
    matched = []
    for a, t in zip(anchors, targets, strict=True):
        if t["boxes"].numel() == 0:
            matched.append(torch.full((a.size(0),), -1, dtype=torch.int64, device=a.device))
        else:
            matched.append(model.proposal_matcher(box_iou(t["boxes"], a)))
    losses = model.compute_loss(targets, head, anchors, matched)
    dets = model.postprocess_detections(head, anchors, batch.image_sizes)
    dets = model.transform.postprocess(dets, batch.image_sizes, sizes)
    return losses, [_as_numpy(d) for d in dets]

def lr_factor(step: int, epoch: int, *, epochs: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up from 0.1 over warmup_steps iterations, then the SSD
    paper's steps, x0.1 once 2/3 and again once 5/6 of the epochs are done (epoch counts from 1)."""
    warm = 0.1 + 0.9 * min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    done = (epoch - 1) / max(epochs, 1)
    return warm * (0.1 ** int(done >= 2 / 3)) * (0.1 ** int(done >= 5 / 6))

@torch.no_grad()
def evaluate(
    model: SSD,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]],
    *,
    device: torch.device,
) -> tuple[float, list[Detections]]:
    """Mean summed SSD loss per image and the detections (model pixels) of every image, in loader order.

    Eval mode throughout (BatchNorm statistics untouched); one forward pass per batch gives both.
    """
    model.eval()
    total, seen, dets = 0.0, 0, []
    for images, targets in loader:
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses, d = losses_and_detections(model, images, targets)
        total += float(sum(losses.values())) * len(images)
        seen += len(images)
        dets.extend(d)
    return (total / seen if seen else float("nan")), dets

BOXES_FILE = "boxes.csv"

def detection_batch(model: nn.Module, batch: tuple[list, list], device: torch.device) -> tuple[torch.Tensor, int]:
    """The detector's batch loss (batches from `collate`): the summed SSD losses of the batch."""
    images = [im.to(device, non_blocking=True) for im in batch[0]]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch[1]]
    return sum(model(images, targets).values()), len(images)

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

def detector_recipe(
    model: nn.Module,
    train_ds: DetectionDataset,
    sampler: Any,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    num_workers: int = 0,
    warmup_epochs: int = 1,
    warmup_max: int = 500,
    validate: Callable[[], dict[str, Any]] = dict,
) -> Recipe:
    """AdamW with a linear warm-up over the first `warmup_epochs` (at most `warmup_max` iterations) and the
    SSD paper's steps (`lr_factor`), over batches of `train_ds` drawn by `sampler`."""
    n = len(sampler)
    loader = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate, drop_last=n > batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    warmup = min(len(loader) * warmup_epochs, warmup_max)
    return Recipe(model=model, optimizer=optimizer, train_loader=loader, batch_loss=detection_batch,
                  validate=validate, images_per_epoch=n,
                  lr_at=lambda s, e: lr * lr_factor(s, e, epochs=epochs, warmup_steps=warmup),
                  history_columns=[*HISTORY_COLUMNS, "val_map50"],
                  config={"warmup_iterations": warmup})


class DetectionTraining:
    """Registry kind "detector": torchvision's SSD on lung boxes labelled by the image's class.

    Targets: every image gets its two lung boxes, each labelled with the image's class (detector label
    class index + 1): annotated boxes where the COCO file covers the image, else the rows of the boxes file
    `cfg.boxes` (or `<out_dir>/boxes.csv`; written by `cxrscreen localize label`), else the atlas. The SSD
    augmentation (`transforms.boxes.DetectionAugment`); `balance="sampler"` samples classes evenly; the SSD
    loss has no class weights, so `balance="loss"` trains unweighted (recorded in config.json). Validation:
    val_loss (SSD losses), the image-rule figures and val_map50. Probabilities: `IMAGE_RULE`.
    """

    kind = "detector"

    def check_config(self, cfg: TrainConfig, out_dir: Path) -> None:
        check_input_size(cfg.arch, cfg.preprocess.image_size)
        if cfg.boxes and not Path(cfg.boxes).is_file():
            raise CXRError("boxes file not found (write it with `cxrscreen localize label`)", Path(cfg.boxes))

    def recipe(self, ctx: TrainContext) -> Recipe:
        if ctx.ddp.enabled:
            raise CXRError(f"{ctx.cfg.arch} is a detector; distributed training is for classifiers (use one process)")
        cfg, tr, va, classes = ctx.cfg, ctx.train, ctx.val, ctx.classes
        boxes_file = Path(cfg.boxes) if cfg.boxes else ctx.out_dir / BOXES_FILE
        source = BoxSource.for_data(ctx.data_dir, boxes_file)
        sizes = image_sizes(ctx.data_dir)
        tr_boxes, tr_lbls, tr_src = subset_targets(tr, source, cfg.preprocess, sizes)
        va_boxes, va_lbls, va_src = subset_targets(va, source, cfg.preprocess, sizes)
        ctx.log(f"boxes: train {tr_src}, val {va_src}")
        if cfg.balance == "loss":
            ctx.log("balance 'loss': the SSD loss has no class weights; training unweighted (use 'sampler' to "
                    "balance)")
        model = create_detector(cfg.arch, num_classes=len(classes), weights_backbone=cfg.weights).to(ctx.device)
        train_ds = DetectionDataset(tr.images, tr_boxes, tr_lbls, DetectionAugment(cfg.preprocess.image_size))
        val_loader = DataLoader(DetectionDataset(va.images, va_boxes, va_lbls), batch_size=cfg.batch_size,
                                collate_fn=collate)
        val_truths = list(zip(va_boxes, va_lbls, strict=True))

        def validate() -> dict[str, Any]:
            val_loss, dets = evaluate(model, val_loader, device=ctx.device)
            row: dict[str, Any] = {"val_loss": val_loss}
            if len(va.labels):
                row.update(val_figures(image_probabilities(dets, len(classes)), va.labels, classes))
                row["val_map50"] = mean_average_precision(dets, val_truths, range(1, len(classes) + 1))
            return row

        recipe = detector_recipe(model, train_ds, epoch_sampler(cfg, tr.labels, len(classes), ctx.generator),
                                 lr=cfg.lr, weight_decay=cfg.weight_decay, epochs=cfg.epochs,
                                 batch_size=cfg.batch_size, num_workers=cfg.num_workers, validate=validate)
        warmup = recipe.config.pop("warmup_iterations")
        recipe.config = {
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
        }
        return recipe
