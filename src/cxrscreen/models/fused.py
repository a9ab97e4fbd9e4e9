"""The PyTorch engine's no-grad forward passes on a copy of the classifier whose BatchNorms are folded into the
convolutions before them.

In eval mode a BatchNorm is an affine map per channel, so it folds into the preceding convolution's weights and
bias: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta. PyTorch's eager CPU kernels run each
BatchNorm as a pass of its own over the activations (the bundled EfficientNet-Lite0 feature head at 224 px: 27 %
of the forward time); ONNX Runtime folds them when it loads the export. The copy gives the same logits within
float32 rounding (tests: probabilities within 1e-5).

Only the loaded model (`run.model`) is ever saved, explained (Grad-CAM hooks its layers) or refitted; the folded
copy is made on the first forward pass, cached per model, and made again when any parameter or buffer of the
model changed (a refitted head) or was replaced. Folding is applied inside timm EfficientNet(-Lite) modules, whose
children run in the order they are registered (a convolution followed by its BatchNorm); other models run
unfolded.
"""

from __future__ import annotations

import copy
import itertools
import threading
import weakref
from typing import Any

import numpy as np
import torch
from torch import nn

FOLDED_CONTAINERS = frozenset({"EfficientNet", "DepthwiseSeparableConv", "InvertedResidual", "EdgeResidual",
                               "ConvBnAct", "CondConvResidual"})
"""timm module classes whose (convolution, BatchNorm) children pairs are folded: each runs its children in the
order they are registered."""

_cache: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _state_key(model: nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: changes when any of them is modified."""
    return tuple((id(t), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode `bn` into `conv` (new weight and bias tensors, in the conv's dtype and memory format).
    The arithmetic is float64 numpy: single-threaded, where 49 pairs of tiny torch ops took a second on a busy
    machine waiting for intra-op worker threads."""

    def f64(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float64)

    w = conv.weight
    scale = f64(bn.weight) / np.sqrt(f64(bn.running_var) + bn.eps)
    bias = f64(conv.bias) if conv.bias is not None else np.zeros_like(scale)
    new_w = torch.from_numpy((f64(w) * scale.reshape(-1, 1, 1, 1)).astype(np.float32)).to(w.dtype)
    if w.is_contiguous(memory_format=torch.channels_last):
        new_w = new_w.contiguous(memory_format=torch.channels_last)
    new_b = torch.from_numpy(((bias - f64(bn.running_mean)) * scale + f64(bn.bias)).astype(np.float32))
    conv.weight = nn.Parameter(new_w.to(w.device), requires_grad=False)
    conv.bias = nn.Parameter(new_b.to(device=w.device, dtype=w.dtype), requires_grad=False)


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What remains of a BatchNorm once folded: timm's BatchNormAct2d keeps its dropout and activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(bn).__name__ in ("BatchNorm2d", "BatchNormAct2d")
            and isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def fold_batchnorms(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of `model` with each BatchNorm that directly follows a convolution inside a timm
    EfficientNet module folded into it; (copy, number of BatchNorms folded). `model` is left as it was; the copy
    shares its tensors that folding does not replace (run it under torch.no_grad)."""
    # the copy shares every tensor with `model` (only its module structure is copied): folding assigns new
    # tensors to the copy's convolutions and never writes into a shared one
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    folded = copy.deepcopy(model, memo=shared).eval()
    n = 0
    for parent in list(folded.modules()):
        if type(parent).__name__ not in FOLDED_CONTAINERS:
            continue
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in itertools.pairwise(children):
            if _foldable(conv, bn):
                _fold_pair(conv, bn)
                setattr(parent, bn_name, _after_norm(bn))
                n += 1
    return folded, n


def forward_model(model: nn.Module) -> Any:
    """The module to run no-grad forward passes of an eval-mode `model` with: its BatchNorm-folded copy (cached,
    remade when the model changed), or `model` itself when in training mode or when nothing folds."""
    if model.training:
        return model
    key = _state_key(model)
    with _cache_lock:
        hit = _cache.get(model)
        if hit is not None and hit[0] == key:
            return hit[1]
        folded, n = fold_batchnorms(model)
        out = folded if n else model
        _cache[model] = (key, out)
        return out
