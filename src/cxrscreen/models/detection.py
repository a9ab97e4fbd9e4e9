"""SSD detectors on grey chest X-rays: building, box transforms, the image rule, inference, drawing.

Two torchvision architectures are registered (kind "detector"): ``ssd300_vgg16`` (the reference study's
SSD300) and ``ssdlite320_mobilenet_v3_large`` (the fast variant). ``create_detector(name, num_classes=3)``
builds one with ``num_classes`` object classes plus torchvision's background class 0, so class k of
the run (``config["classes"][k]``) is detector label ``k + 1``.

Input contract. A detector takes a list of float tensors (1, S, S) with grey values in [0, 1]: the
uint8 square of ``Preprocessor`` divided by 255 (CLAHE, crop / pad and size all come from the run's
``PreprocessConfig``). Grey input is handled inside the network, not by repeating the image to three
channels: the model's ``GeneralizedRCNNTransform`` is replaced by ``GreyTransform``, which normalises one
channel with ``GREY_MEAN`` / ``GREY_STD`` (the ``PreprocessConfig`` defaults; a run's own mean / std
are not used by detectors) and does not resize (the Preprocessor already did), and the backbone's
first convolution takes one channel. For ImageNet weights its RGB filters are folded into one grey
filter together with the backbone's own normalisation, so that on grey input it computes what the
RGB network computes on the grey image repeated to three channels (exactly, up to the border padding).
This keeps the model one channel wide end to end, like the classifiers of the registry.
``ssd300_vgg16`` has fixed anchor steps and so needs S = 300; ``ssdlite320_mobilenet_v3_large`` runs
at any S >= 64 (its anchors follow the feature-map sizes).

Image rule (stored as ``IMAGE_RULE`` in config.json under "image_rule"). For each class c,
``score_c`` is the highest score among the image's detections of class c (0 if none), and the class
probabilities are ``score / sum(score)``, uniform when no detection is left. A noisy-or
(``1 - prod(1 - s)``) was not chosen: SSD keeps up to 200 overlapping low-score detections per class
after NMS, and their noisy-or saturates near 1 for every class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.models import MobileNet_V3_Large_Weights, VGG16_Weights, mobilenet_v3_large
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor, _normal_init
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_iou, nms
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

from cxrscreen.errors import CXRError
from cxrscreen.transforms import Geometry

GREY_MEAN = 0.5
GREY_STD = 0.25
DETECTORS: dict[str, dict[str, Any]] = {
    # fixed_size: the only input side the architecture accepts (None: any side >= min_size)
    "ssd300_vgg16": {"default_size": 300, "fixed_size": 300, "min_size": 300},
    "ssdlite320_mobilenet_v3_large": {"default_size": 320, "fixed_size": None, "min_size": 64},
}
IMAGE_RULE: dict[str, str] = {
    "name": "max_score_normalised",
    "rule": "score_c = max score of the image's class-c detections (0 if none); "
    "probabilities = score / sum(score), uniform if all scores are 0",
}
REPORT_MIN_SCORE = 0.2  # boxes shown in prediction results / drawings
REPORT_MAX_BOXES = 10

Detections = dict[str, np.ndarray]  # "boxes" (K, 4) float32 x0 y0 x1 y1, "labels" (K,) int64, "scores" (K,)


# --------------------------------------------------------------------------------------------- building
class GreyTransform(GeneralizedRCNNTransform):
    """torchvision's detection input transform for one grey channel, without resizing.

    Input: list of (1, S, S) float tensors in [0, 1] (all the same S). Output: normalised batch.
    """

    def __init__(self, mean: float = GREY_MEAN, std: float = GREY_STD) -> None:
        super().__init__(1, 1, [mean], [std], size_divisible=1)

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, Any]:
        return image, target


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def grey_conv(
    conv: nn.Conv2d,
    *,
    pretrained: bool,
    rgb_mean: Sequence[float] = (0.0, 0.0, 0.0),
    rgb_std: Sequence[float] = (1.0, 1.0, 1.0),
    mean: float = GREY_MEAN,
    std: float = GREY_STD,
) -> nn.Conv2d:
    """A one-channel copy of an RGB convolution.

    pretrained=True: the filters expect RGB input normalised as (x - rgb_mean[c]) / rgb_std[c]; the new
    filter takes (x - mean) / std and sums the RGB filters scaled accordingly (the mean shift goes into
    the bias when there is one; where there is none, as before BatchNorm, the shift must be 0 or is left
    to the BatchNorm). pretrained=False: the first input channel of the (random) filters, which keeps the
    architecture's initialisation distribution.
    """
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        w = conv.weight
        if pretrained:
            scale = torch.tensor([std / s for s in rgb_std], dtype=w.dtype).view(1, -1, 1, 1)
            new.weight.copy_((w * scale).sum(1, keepdim=True))
            if conv.bias is not None:
                shift = torch.tensor([(mean - m) / s for m, s in zip(rgb_mean, rgb_std, strict=True)], dtype=w.dtype)
                new.bias.copy_(conv.bias + (w.sum((2, 3)) * shift).sum(1))
        else:
            new.weight.copy_(w[:, :1])
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(conv.weight.requires_grad)
    return new


def fetch_backbone(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of a detector's backbone (downloads on first use); CXRError when offline."""
    enum = VGG16_Weights.IMAGENET1K_FEATURES if name == "ssd300_vgg16" else MobileNet_V3_Large_Weights.IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # network, hub cache or hash failures all mean "not available here"
        raise CXRError(
            f"ImageNet backbone weights for {name} ({enum}) could not be loaded ({type(exc).__name__}: {exc}). "
            "They download from download.pytorch.org on first use; on an offline machine, copy them into "
            "the torch hub cache ($TORCH_HOME/hub/checkpoints) or train with --weights none."
        ) from exc


def _ssd300(num_labels: int, state: dict[str, torch.Tensor] | None) -> SSD:
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_labels)
    if state is not None:  # torchvision's VGG feature layers sit in backbone.features / backbone.extra[0]
        ours = model.backbone.state_dict()
        n_feat = len(model.backbone.features)
        mapped = {}
        for k, v in state.items():
            if not k.startswith("features."):
                continue
            i, rest = k.split(".", 2)[1:]
            key = f"features.{i}.{rest}" if int(i) < n_feat else f"extra.0.{int(i) - n_feat}.{rest}"
            if key in ours and ours[key].shape == v.shape:
                mapped[key] = v
        missing = [k for k in ours if k.startswith("features.") and k not in mapped]
        if missing:
            raise CXRError(f"ImageNet VGG16 weights do not fit the SSD backbone (missing {missing[0]})")
        model.backbone.load_state_dict(mapped, strict=False)
        for i in range(5):  # the first stage stays frozen, as in torchvision's pretrained recipe
            for p in model.backbone.features[i].parameters():
                p.requires_grad_(False)
    conv = model.backbone.features[0]
    model.backbone.features[0] = grey_conv(conv, pretrained=state is not None, rgb_mean=(0.48235, 0.45882, 0.40784),
                                           rgb_std=(1 / 255, 1 / 255, 1 / 255))
    return model


def _ssdlite(num_labels: int, state: dict[str, torch.Tensor] | None) -> SSD:
    # torchvision's builder switches to MobileNetV3's reduced tail without ImageNet weights, so the two
    # would differ in shape and a run could not be rebuilt from config.json alone; the full tail is used
    # either way. BatchNorm momentum 0.1 (torchvision: 0.03) lets short CPU runs settle their statistics.
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)
    net = mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=False)
    if state is None:
        _normal_init(net)
    else:
        net.load_state_dict(state)
    backbone = _mobilenet_extractor(net, 6, norm)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = det_utils.retrieve_out_channels(backbone, (320, 320))
    head = SSDLiteHead(out_channels, anchors.num_anchors_per_location(), num_labels, norm)
    model = SSD(backbone, anchors, (320, 320), num_labels, head=head, score_thresh=0.01, nms_thresh=0.55,
                detections_per_img=200, topk_candidates=300)
    path = "backbone.features.0.0.0"
    _replace(model, path, grey_conv(model.get_submodule(path), pretrained=state is not None,
                                    rgb_mean=(0.5, 0.5, 0.5), rgb_std=(0.5, 0.5, 0.5)))
    return model


def create_detector(
    name: str,
    *,
    num_classes: int = 3,
    weights_backbone: str | None = None,
    fetch: Callable[[str], dict[str, torch.Tensor]] = fetch_backbone,
) -> SSD:
    """Build a grey-input SSD.

    Args:
        name: "ssd300_vgg16" or "ssdlite320_mobilenet_v3_large".
        num_classes: object classes WITHOUT background (3 for covid / normal / pneumonia, 2 for the lungs);
            the network has num_classes + 1 outputs, label 0 being background.
        weights_backbone: None / "none" (from scratch) or "imagenet" (torchvision's ImageNet backbone,
            downloaded on first use; CXRError when it cannot be had).
        fetch: how the backbone state dict is obtained (replaceable in tests).
    Returns:
        torchvision SSD: images list[(1, S, S) float in [0, 1]] -> detections (eval) or losses (train).
    """
    if name not in DETECTORS:
        raise CXRError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    if weights_backbone not in (None, "none", "imagenet"):
        raise CXRError(f"unknown weights {weights_backbone!r}; use 'none' or 'imagenet'")
    state = fetch(name) if weights_backbone == "imagenet" else None
    model = _ssd300(num_classes + 1, state) if name == "ssd300_vgg16" else _ssdlite(num_classes + 1, state)
    model.transform = GreyTransform()
    return model


def check_input_size(name: str, size: int) -> None:
    """CXRError when a detector cannot run on S x S inputs."""
    info = DETECTORS[name]
    if info["fixed_size"] is not None and size != info["fixed_size"]:
        raise CXRError(f"{name} needs image_size {info['fixed_size']} (its anchor steps are fixed), got {size}")
    if size < info["min_size"]:
        raise CXRError(f"{name} needs image_size >= {info['min_size']}, got {size}")


# ------------------------------------------------------------------------------------------------ boxes
def boxes_to_model(geom: Geometry, boxes: np.ndarray, min_side: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Original-pixel boxes (K, 4) x0 y0 x1 y1 -> model-pixel boxes clipped to [0, size].

    Returns (boxes (M, 4) float32, kept (M,) indices into the input): boxes with a side below
    ``min_side`` model pixels after clipping (e.g. cut away by a centre crop) are dropped.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    out = np.array([geom.box_to_model(tuple(b)) for b in boxes], np.float32).reshape(-1, 4)
    out = np.clip(out, 0, geom.size)
    keep = np.flatnonzero(((out[:, 2] - out[:, 0]) >= min_side) & ((out[:, 3] - out[:, 1]) >= min_side))
    return out[keep], keep


class FlipBoxes:
    """Horizontal flip with probability p of an image and its boxes, optionally swapping labels.

    ``swap`` maps labels that change under a flip (the image's right lung appears on the viewer's left,
    so a flipped right lung is drawn where a left lung would be): {1: 2, 2: 1} for the localizer, None
    for the detector (its label is the image's class). Input / output: dict sample with "image",
    "boxes" (tv_tensors.BoundingBoxes) and "labels".
    """

    def __init__(self, p: float = 0.5, swap: dict[int, int] | None = None) -> None:
        self.p = p
        self.swap = swap

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if torch.rand(()) >= self.p:
            return sample
        out = dict(sample)
        out["image"] = tvf.horizontal_flip(sample["image"])
        out["boxes"] = tvf.horizontal_flip(sample["boxes"])
        if self.swap:
            labels = sample["labels"].clone()
            for a, b in self.swap.items():
                labels[sample["labels"] == a] = b
            out["labels"] = labels
        return out


class DetectionAugment:
    """The SSD paper's augmentation on grey squares, with torchvision.transforms.v2.

    Photometric distortion (brightness / contrast; saturation, hue and channel order do nothing on one
    channel), zoom-out onto a mid-grey canvas (p 0.5, up to 4x), then either the whole image or an IoU
    crop (min IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9 or a free patch, size [0.1, 1] of the side), boxes
    sanitised (dropped when cut away), a horizontal flip (``FlipBoxes``), and a resize back to S x S.
    Input: uint8 (1, S, S), boxes (K, 4) model pixels, labels (K,). Output: float image (1, S, S) in
    [0, 1] and the target dict {"boxes": float32 (M, 4), "labels": int64 (M,)}.
    """

    def __init__(self, size: int, *, swap: dict[int, int] | None = None) -> None:
        self.size = size
        self.photometric = v2.RandomPhotometricDistort(p=0.5)
        self.zoom_out = v2.RandomZoomOut(fill={tv_tensors.Image: 128, "others": 0}, side_range=(1.0, 4.0), p=0.5)
        self.crop = v2.RandomIoUCrop(min_scale=0.1, max_scale=1.0,
                                     sampler_options=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 2.0])
        self.sanitize = v2.SanitizeBoundingBoxes(min_size=2.0)
        self.flip = FlipBoxes(0.5, swap)
        self.resize = v2.Resize((size, size), antialias=True)

    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = image.shape[-1]
        sample: dict[str, Any] = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes.float().reshape(-1, 4), format="XYXY", canvas_size=(s, s)),
            "labels": labels.long(),
        }
        sample = self.photometric(sample)
        sample = self.zoom_out(sample)
        if len(sample["boxes"]):
            sample = self.crop(sample)
        sample = self.sanitize(sample)
        sample = self.flip(sample)
        sample = self.resize(sample)
        sample = self.sanitize(sample)
        img = tvf.to_dtype(sample["image"], torch.float32, scale=True).as_subclass(torch.Tensor)
        target = {"boxes": sample["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
                  "labels": sample["labels"].long()}
        return img, target


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


_COLOURS = [(60, 60, 230), (60, 200, 60), (230, 150, 40), (200, 60, 200), (40, 200, 230)]  # BGR


def draw_boxes(pixels: np.ndarray, boxes: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write a PNG of a grey image (H, W; float in [0, 1] or uint8) with boxes, class and score.

    boxes: dicts with "box" (x0, y0, x1, y1 in the image's pixels), "class" and "score", as in
    ``result_boxes``. Returns the path written (folders are created).
    """
    img = np.asarray(pixels)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    canvas = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    thick = max(1, round(max(img.shape) / 300))
    names: dict[str, int] = {}
    for b in boxes:
        colour = _COLOURS[names.setdefault(str(b["class"]), len(names)) % len(_COLOURS)]
        x0, y0, x1, y1 = (round(float(v)) for v in b["box"])
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, thick)
        text = f"{b['class']} {100 * float(b['score']):.0f}%"
        scale = 0.4 * thick
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = max(th + base, y0)
        cv2.rectangle(canvas, (x0, ty - th - base), (x0 + tw, ty), colour, -1)
        cv2.putText(canvas, text, (x0, ty - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), canvas):
        raise CXRError("could not write the image", path)
    return path


# ---------------------------------------------------------------------------------------------- metrics
def average_precision(
    preds: Sequence[Detections], truths: Sequence[tuple[np.ndarray, np.ndarray]], label: int, iou: float = 0.5
) -> float | None:
    """All-point interpolated AP of one label (PASCAL VOC 2010+ / COCO style at one IoU).

    preds[i]: detections of image i; truths[i]: (boxes (K, 4), labels (K,)) in the same pixels.
    A detection matches the best-overlapping unmatched true box of its label at IoU >= iou.
    Returns None when no true box has this label.
    """
    n_true = sum(int((np.asarray(t[1]) == label).sum()) for t in truths)
    if n_true == 0:
        return None
    scored: list[tuple[float, int, np.ndarray]] = []
    for i, d in enumerate(preds):
        m = d["labels"] == label
        scored.extend((float(s), i, b) for s, b in zip(d["scores"][m], d["boxes"][m], strict=True))
    scored.sort(key=lambda x: -x[0])
    used = [np.zeros(int((np.asarray(t[1]) == label).sum()), bool) for t in truths]
    gt = [torch.as_tensor(np.asarray(t[0], np.float32).reshape(-1, 4)[np.asarray(t[1]) == label]) for t in truths]
    tp = np.zeros(len(scored))
    for k, (_, i, b) in enumerate(scored):
        if len(gt[i]) == 0:
            continue
        ious = box_iou(torch.as_tensor(b, dtype=torch.float32).view(1, 4), gt[i])[0].numpy()
        ious[used[i]] = -1.0
        j = int(ious.argmax())
        if ious[j] >= iou:
            used[i][j] = True
            tp[k] = 1
    ctp = np.cumsum(tp)
    recall = np.concatenate([[0.0], ctp / n_true])
    precision = np.concatenate([[1.0], ctp / np.arange(1, len(scored) + 1)])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def mean_average_precision(
    preds: Sequence[Detections], truths: Sequence[tuple[np.ndarray, np.ndarray]], labels: Sequence[int],
    iou: float = 0.5,
) -> float | None:
    """Mean over labels (those with true boxes) of ``average_precision``; None if none has any."""
    aps = [a for a in (average_precision(preds, truths, lb, iou) for lb in labels) if a is not None]
    return float(np.mean(aps)) if aps else None


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
