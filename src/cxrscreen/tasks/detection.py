"""Detection at inference: an SSD's detections -> class probabilities (`IMAGE_RULE`) and result boxes.

The architectures live in `models.detectors`; training (the box dataset, batch loss, validation pass and
recipe) in `training.detection`. This module imports nothing from training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import nms

from cxrscreen.errors import CXRError
from cxrscreen.models.detectors import Detections
from cxrscreen.tasks.base import Drawer
from cxrscreen.transforms.preprocess import Geometry

if TYPE_CHECKING:
    from cxrscreen.runs.run_dir import LoadedRun

IMAGE_RULE: dict[str, str] = {
    "name": "max_score_normalised",
    "rule": "score_c = max score of the image's class-c detections (0 if none); "
    "probabilities = score / sum(score), uniform if all scores are 0",
}

REPORT_MIN_SCORE = 0.2  # boxes shown in prediction results / drawings
REPORT_MAX_BOXES = 10



def to_input(image_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (S, S) or (1, S, S) -> float (1, S, S) in [0, 1], the detector's input."""
    t = torch.as_tensor(image_u8)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    return t.float() / 255.0

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


def best_per_lung(det: Detections) -> Detections:
    """At most one box per lung label: the highest-scoring one."""
    keep = []
    from cxrscreen.data.lung_boxes import LEFT, RIGHT  # the lung labels (1, 2); data's module, imported late

    for lbl in (RIGHT, LEFT):
        idx = np.flatnonzero(det["labels"] == lbl)
        if len(idx):
            keep.append(int(idx[np.argmax(det["scores"][idx])]))
    k = np.array(keep, np.int64)
    return {"boxes": det["boxes"][k].reshape(-1, 4), "labels": det["labels"][k], "scores": det["scores"][k]}


def to_original(det: Detections, geom: Geometry) -> Detections:
    """Detection boxes from model pixels to original pixels."""
    boxes = np.array([geom.box_to_original(tuple(map(float, b))) for b in det["boxes"]], np.float32).reshape(-1, 4)
    return {**det, "boxes": boxes}


class DetectionTask:
    """Registry kinds "detector" and "localizer" at inference: torchvision's SSD on lung boxes labelled by the
    image's class; probabilities by `IMAGE_RULE`, boxes in original pixels, drawn as boxes."""

    kind = "detector"
    has_logits = False
    drawing = "boxes"

    def for_inference(self, model: nn.Module) -> nn.Module:
        return model.eval()

    def logits(self, run: LoadedRun, images: Sequence[np.ndarray] | np.ndarray, *, batch_size: int = 64
               ) -> np.ndarray:
        raise CXRError(f"{run.arch} is a {self.kind}: it gives detections, not class logits "
                       "(calibration, Grad-CAM and the audit need a classifier)", run.run_dir)

    def outputs(self, run: LoadedRun, images: Sequence[np.ndarray] | np.ndarray,
                geometries: Sequence[Geometry] | None = None, *, batch_size: int = 32, calibrated: bool = True
                ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        dets = detect(run.model, images, batch_size=min(batch_size, 16))
        probs = image_probabilities(dets, len(run.classes))
        if geometries is None:
            return probs, [{} for _ in dets]
        return probs, [{"boxes": result_boxes(d, g, run.classes)} for d, g in zip(dets, geometries, strict=True)]

    def drawer(self, run: LoadedRun) -> Drawer:
        return BoxDrawer()


class BoxDrawer:
    """A detector's `tasks.base.Drawer`: the result's boxes on the X-ray; no model pass (`explain` gives None per
    input), no caption band (each box carries its class and score), the severity zones in a band below."""

    def explain(self, preps: Sequence[Any], targets: Sequence[str | None]) -> list[None]:
        return [None] * len(preps)

    def __call__(self, prep: Any, result: dict[str, Any], target: str | None, *, caption: bool = True,
                 explanation: Any = None) -> np.ndarray:
        from cxrscreen.explain.overlay import boxes_picture
        from cxrscreen.severity.zones import with_zones

        return with_zones(boxes_picture(prep.xray.pixels, result.get("boxes", [])), result)
