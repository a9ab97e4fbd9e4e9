"""Feature-head classifiers: a frozen ImageNet EfficientNet-Lite, the global averages of several of its stages,
standardised, and one linear layer.

The backbone is never trained: the head (and the standardisation it expects) is fitted by a solver on cached
features (`cxrscreen.training.head`), which keeps what the ImageNet features carry to hospitals the training data
never saw. The whole network is still one `nn.Module` mapping a grey image (N, 1, S, S) to logits (N, C), so it
loads, calibrates, explains (Grad-CAM reads the last chosen stage), exports to ONNX and serves like every other
classifier of the registry. Its options (`stages`, `flip`) travel in the run's config.json as `model_options`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cxrscreen.errors import CXRError

HEAD_STAGE = "head"  # after conv_head + bn2 + activation: the 1280-d features a timm classifier pools
DEFAULT_STAGES: tuple[str, ...] = ("blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6")
OPTION_KEYS = ("stages", "flip")


def stage_names(n_blocks: int) -> tuple[str, ...]:
    """Every stage a timm EfficientNet with `n_blocks` blocks offers, in forward order."""
    return (*(f"blocks.{i}" for i in range(n_blocks)), HEAD_STAGE)


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The feature-head options with defaults filled in: {"stages": [...], "flip": bool}.

    CXRError for an unknown key, an empty or repeated stage list, or a stage name that is not 'blocks.N' / 'head'.
    """
    options = dict(options or {})
    unknown = set(options) - set(OPTION_KEYS)
    if unknown:
        raise CXRError(f"unknown feature-head option(s) {', '.join(sorted(unknown))}; known: {', '.join(OPTION_KEYS)}")
    stages = [str(s) for s in options.get("stages", DEFAULT_STAGES)]
    if not stages:
        raise CXRError("a feature-head model needs at least one stage")
    if len(set(stages)) != len(stages):
        raise CXRError(f"feature-head stages repeat: {stages}")
    for s in stages:
        if s != HEAD_STAGE and not (s.startswith("blocks.") and s[7:].isdigit()):
            raise CXRError(f"unknown feature stage {s!r}; use 'blocks.N' or 'head'")
    return {"stages": stages, "flip": bool(options.get("flip", False))}


class FeatureHeadNet(nn.Module):
    """Frozen timm EfficientNet(-Lite) backbone -> pooled stages -> (f - mean) / scale -> linear logits.

    Args:
        backbone: a timm EfficientNet (conv_stem, bn1, blocks, conv_head, bn2); its first convolution may take
            one grey channel (create_model folds it).
        num_classes: outputs of the linear head.
        stages: the stages whose global averages are concatenated, in this order ("blocks.N" or "head").
        flip: average the features with those of the horizontally mirrored image.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, stages: Sequence[str] = DEFAULT_STAGES,
                 flip: bool = False) -> None:
        super().__init__()
        for part in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"):
            if not hasattr(backbone, part):
                raise CXRError(f"a feature-head model needs a timm EfficientNet backbone; {type(backbone).__name__} "
                               f"has no {part!r}")
        known = stage_names(len(backbone.blocks))
        bad = [s for s in stages if s not in known]
        if bad:
            raise CXRError(f"the backbone has no stage {bad[0]!r}; it has {', '.join(known)}")
        self.backbone = backbone
        self.stages = tuple(stages)
        self.flip = bool(flip)
        self.all_dims = self._stage_dims()
        self.dims = [self.all_dims[s] for s in self.stages]
        dim = sum(self.dims)
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_scale", torch.ones(dim))
        # the backbone is frozen by construction (the head is fitted by a solver on cached features, nothing here
        # takes gradient steps); its parameters keep requires_grad so that Grad-CAM can read activation gradients
        self.head = nn.Linear(dim, num_classes)

    def _stage_dims(self) -> dict[str, int]:
        dims: dict[str, int] = {}
        for i, blk in enumerate(self.backbone.blocks):
            convs = [m for m in blk.modules() if isinstance(m, nn.Conv2d)]
            dims[f"blocks.{i}"] = convs[-1].out_channels
        dims[HEAD_STAGE] = self.backbone.conv_head.out_channels
        return dims

    def _pooled_once(self, x: torch.Tensor, stages: Sequence[str]) -> torch.Tensor:
        b = self.backbone
        wanted = set(stages)
        last = max(stages, key=lambda s: len(b.blocks) if s == HEAD_STAGE else int(s[7:]))
        got: dict[str, torch.Tensor] = {}
        x = b.bn1(b.conv_stem(x))
        for i, blk in enumerate(b.blocks):
            x = blk(x)
            name = f"blocks.{i}"
            if name in wanted:
                got[name] = x.mean(dim=(2, 3))
            if name == last:
                break
        else:
            got[HEAD_STAGE] = b.bn2(b.conv_head(x)).mean(dim=(2, 3))
        return torch.cat([got[s] for s in stages], dim=1)

    def pooled(self, x: torch.Tensor, stages: Sequence[str] | None = None) -> torch.Tensor:
        """Raw (unstandardised) pooled features (N, D) of normalised grey images (N, 1, S, S): the chosen
        `stages` (default: the model's), averaged with the mirrored image's when the model flips."""
        stages = self.stages if stages is None else tuple(stages)
        f = self._pooled_once(x, stages)
        if self.flip:
            f = (f + self._pooled_once(torch.flip(x, dims=(3,)), stages)) / 2
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.pooled(x) - self.feature_mean) / self.feature_scale
        return self.head(z)

    def set_head(self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Install a fitted standardisation (D,), (D,) and linear head (C, D), (C,)."""
        with torch.no_grad():
            self.feature_mean.copy_(torch.as_tensor(mean, dtype=self.feature_mean.dtype))
            self.feature_scale.copy_(torch.as_tensor(scale, dtype=self.feature_scale.dtype))
            self.head.weight.copy_(torch.as_tensor(weight, dtype=self.head.weight.dtype))
            self.head.bias.copy_(torch.as_tensor(bias, dtype=self.head.bias.dtype))

    def train(self, mode: bool = True) -> FeatureHeadNet:
        """The backbone stays in eval mode (its BatchNorm statistics are ImageNet's and never move)."""
        super().train(mode)
        self.backbone.eval()
        return self


def build_feature_head(timm_name: str, *, num_classes: int, pretrained: bool,
                       options: dict[str, Any] | None = None) -> FeatureHeadNet:
    """A FeatureHeadNet on timm's `timm_name` (ImageNet weights from `efficientnet_lite` when `pretrained`)."""
    import timm

    from cxrscreen.models.efficientnet_lite import load_lite_imagenet

    opts = check_options(options)
    backbone = load_lite_imagenet(timm_name) if pretrained else timm.create_model(timm_name, pretrained=False)
    return FeatureHeadNet(backbone, num_classes, stages=opts["stages"], flip=opts["flip"])


def cam_layer_for(stages: Sequence[str]) -> str:
    """The Grad-CAM target of a feature-head model: the last (deepest) chosen stage, as a module path."""
    def depth(s: str) -> int:
        return 10_000 if s == HEAD_STAGE else int(s[7:])

    last = max(stages, key=depth)
    return "backbone.bn2" if last == HEAD_STAGE else f"backbone.{last}"
