"""Grad-CAM with only the gradients it uses: those of the target layer's output.

Grad-CAM needs d(class score)/d(target layer activations). A plain backward pass also computes the gradient of
every parameter of the network and carries the graph back through every layer before the target layer; for
the bundled model that made Grad-CAM three times as slow as the forward pass. Inside `head_gradients_only`
the model's parameters do not require gradients and a forward hook, registered before Grad-CAM's own hooks,
makes the target layer's output a leaf that requires them: the layers before it run without building a graph,
and the backward pass covers only the layers after it. The heat map is the same (the gradient reaching the
target layer is computed by the same operations).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


@contextlib.contextmanager
def head_gradients_only(model: nn.Module, layer: nn.Module) -> Iterator[None]:
    """Within the block, backward passes of `model` stop at `layer`'s output (see the module docstring).
    Enter it before the Grad-CAM object is made (its hooks must see the leaf). The parameters' requires_grad
    flags are restored on exit."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    def leaf(_: nn.Module, __: Any, output: Any) -> Any:
        return output.detach().requires_grad_(True)

    handle = layer.register_forward_hook(leaf)
    try:
        yield
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)


def grad_cam_heatmap(explainer: Any, prep: Any, target: str) -> Any:
    """`explain.cam.Explainer.heatmap(prep, target)` (float32 (H, W) on the original grid) within
    `head_gradients_only`."""
    with head_gradients_only(explainer.run.model, explainer.layer):
        return explainer.heatmap(prep, target)
