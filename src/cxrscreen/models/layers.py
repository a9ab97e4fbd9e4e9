"""Layers shared by the architectures: one-channel (grey) first convolutions made from RGB ones."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cxrscreen.errors import CXRError

GREY_MEAN = 0.5  # the PreprocessConfig defaults: a grey input normalised as (x - 0.5) / 0.25
GREY_STD = 0.25


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def weights_unavailable(what: str, exc: Exception) -> CXRError:
    """The error for ImageNet weights that cannot be had (network, hub cache or hash failures)."""
    return CXRError(
        f"ImageNet weights for {what} could not be loaded ({type(exc).__name__}: {exc}). "
        "They download from download.pytorch.org on first use; on an offline machine, copy them into "
        "the torch hub cache ($TORCH_HOME/hub/checkpoints) or train with --weights none."
    )


def grey_filters(
    w: torch.Tensor,
    *,
    rgb_mean: Sequence[float] = (0.0, 0.0, 0.0),
    rgb_std: Sequence[float] = (1.0, 1.0, 1.0),
    mean: float = 0.0,
    std: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey filters (O, 1, k, k) equivalent to RGB filters w (O, 3, k, k), and the bias shift (O,).

    The RGB filters expect (x - rgb_mean[c]) / rgb_std[c] in every channel; the grey filter takes
    (x - mean) / std once and gives the same response: the RGB filters scaled by std / rgb_std[c] and
    summed, plus a per-filter shift from the means (which goes into a bias, or is left to a BatchNorm).
    """
    scale = torch.tensor([std / s for s in rgb_std], dtype=w.dtype).view(1, -1, 1, 1)
    shift = torch.tensor([(mean - m) / s for m, s in zip(rgb_mean, rgb_std, strict=True)], dtype=w.dtype)
    return (w * scale).sum(1, keepdim=True), (w.sum((2, 3)) * shift).sum(1)


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
        if pretrained:
            weight, shift = grey_filters(conv.weight, rgb_mean=rgb_mean, rgb_std=rgb_std, mean=mean, std=std)
            new.weight.copy_(weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias + shift)
        else:
            new.weight.copy_(conv.weight[:, :1])
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(conv.weight.requires_grad)
    return new


def fold_to_grey(conv: nn.Conv2d, in_chans: int = 1) -> None:
    """Make `conv` take `in_chans` channels, in place: its RGB filters are summed into grey ones (so a grey
    image gives what the RGB model gives on that image repeated in every channel). In place, so that
    subclasses such as timm's Conv2dSame keep their padding rule."""
    if conv.groups != 1:
        raise TypeError("cannot fold a grouped first convolution")
    with torch.no_grad():
        w = grey_filters(conv.weight)[0].repeat(1, in_chans, 1, 1) / in_chans
    conv.weight = nn.Parameter(w)
    conv.in_channels = in_chans

