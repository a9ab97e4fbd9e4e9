"""detection: moved from cxrscreen.models.detection."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou, nms

from cxrscreen.transforms.boxes import DetectionAugment
from cxrscreen.transforms.preprocess import Geometry

IMAGE_RULE: dict[str, str] = {
    "name": "max_score_normalised",
    "rule": "score_c = max score of the image's class-c detections (0 if none); "
    "probabilities = score / sum(score), uniform if all scores are 0",
}
REPORT_MIN_SCORE = 0.2  # boxes shown in prediction results / drawings
REPORT_MAX_BOXES = 10

Detections = dict[str, np.ndarray]  # "boxes" (K, 4) float32 x0 y0 x1 y1, "labels" (K,) int64, "scores" (K,)


def to_input(image_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (S, S) or (1, S, S) -> float (1, S, S) in [0, 1], the detector's input."""
    t = torch.as_tensor(image_u8)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    return t.float() / 255.0


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


# -------------------------------------------------------------------------------------------- inference
def _as_numpy(det: dict[str, torch.Tensor]) -> Detections:
    return {"boxes": det["boxes"].detach().float().cpu().numpy().reshape(-1, 4),
            "labels": det["labels"].detach().cpu().numpy().astype(np.int64),
            "scores": det["scores"].detach().float().cpu().numpy()}


@torch.no_grad()
def detect(model: nn.Module, images: Sequence[np.ndarray] | np.ndarray, *, batch_size: int = 16) -> list[Detections]:
    """Detections of uint8 squares (N, S, S), in model pixels, one dict per image (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    out: list[Detections] = []
    for i in range(0, len(images), batch_size):
        batch = [to_input(im).to(device) for im in images[i : i + batch_size]]
        out.extend(_as_numpy(d) for d in model(batch))
    return out


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


def image_probabilities(detections: Sequence[Detections], num_classes: int) -> np.ndarray:
    """The image rule (see the module docstring): detections -> class probabilities (N, num_classes).

    Detection label k + 1 is class k; label 0 (background) and labels above num_classes are ignored.
    """
    out = np.zeros((len(detections), num_classes), np.float64)
    for i, d in enumerate(detections):
        for lbl, s in zip(d["labels"], d["scores"], strict=True):
            if 1 <= lbl <= num_classes:
                out[i, lbl - 1] = max(out[i, lbl - 1], float(s))
    total = out.sum(1, keepdims=True)
    return np.where(total > 0, out / np.where(total > 0, total, 1.0), 1.0 / num_classes)


def detector_probabilities(
    model: nn.Module, images: np.ndarray, num_classes: int, *, batch_size: int = 16
) -> np.ndarray:
    """Class probabilities (N, C) of uint8 squares (N, S, S) by the image rule."""
    return image_probabilities(detect(model, images, batch_size=batch_size), num_classes)


def result_boxes(
    det: Detections,
    geom: Geometry,
    classes: Sequence[str],
    *,
    min_score: float = REPORT_MIN_SCORE,
    max_boxes: int = REPORT_MAX_BOXES,
) -> list[dict[str, Any]]:
    """Boxes for a prediction result, in ORIGINAL image pixels, best first.

    Detections scoring at least min_score, with class-agnostic NMS (IoU 0.5) so that one lung shows
    once with its best class; each is {"box": [x0, y0, x1, y1], "label": detector label, "class", "score"}.
    """
    keep = np.flatnonzero(det["scores"] >= min_score)
    if len(keep) == 0:
        return []
    boxes = torch.from_numpy(det["boxes"][keep])
    order = nms(boxes, torch.from_numpy(det["scores"][keep]), 0.5).numpy()[:max_boxes]
    out = []
    for j in keep[order]:
        lbl = int(det["labels"][j])
        box = geom.box_to_original(tuple(float(v) for v in det["boxes"][j]))
        out.append({"box": [round(v, 1) for v in box], "label": lbl,
                    "class": classes[lbl - 1] if 1 <= lbl <= len(classes) else str(lbl),
                    "score": float(det["scores"][j])})
    return out


# -------------------------------------------------------------------------------------------- training
def lr_factor(step: int, epoch: int, *, epochs: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up from 0.1 over warmup_steps iterations, then the SSD
    paper's steps, x0.1 once 2/3 and again once 5/6 of the epochs are done (epoch counts from 1)."""
    warm = 0.1 + 0.9 * min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    done = (epoch - 1) / max(epochs, 1)
    return warm * (0.1 ** int(done >= 2 / 3)) * (0.1 ** int(done >= 5 / 6))


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    lr_at: Callable[[int], float] | None = None,
    step: int = 0,
    on_batch: Callable[[int], None] | None = None,
    deadline: Callable[[], bool] | None = None,
) -> tuple[float, int, int]:
    """Train a detector over ``loader`` once (batches from ``collate``).

    lr_at(step) -> learning rate set before each iteration (global step counter ``step`` onwards).
    deadline: checked after each batch; True stops the epoch (time budgets).
    Returns (mean summed SSD loss per image, images seen, global step after the epoch).
    """
    model.train()
    total, seen = 0.0, 0
    for images, targets in loader:
        if lr_at is not None:
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step)
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        total += float(loss.detach()) * len(images)
        seen += len(images)
        if on_batch is not None:
            on_batch(len(images))
        if deadline is not None and deadline():
            break
    return total / max(seen, 1), seen, step


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

