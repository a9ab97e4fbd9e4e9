"""A frozen TorchScript graph of a network (the classifier, the lung segmenter), for many images on the CPU.

`torch.jit.freeze` inlines the weights and folds each BatchNorm into its convolution; on 2 CPU threads the
bundled feature-head model's forward pass runs about 1.4x as fast as the eager module (38 -> 55 images/s at
224 px, batch 32, measured on an idle 2-core machine; `benchmarks/inference.py` gives the end-to-end figure).
Tracing and freezing cost about 1 s (4 s on a busy machine), and each new batch shape costs one slower profiling
pass, so only runs of many images use it (`predict.predictor.FREEZE_MIN_IMAGES`). Grad-CAM keeps the eager
module: it needs hooks and gradients.

TorchScript is deprecated in favour of `torch.compile`, which gave the same speed here but took 77 s to compile;
if tracing or freezing fails, or the graph's logits differ from the eager module's, `freeze_for_inference` returns
None and the caller keeps the eager module.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

PARITY_ATOL = 1e-3  # the frozen graph's output against the eager module's, on a random batch


def freeze_for_inference(model: torch.nn.Module, image_size: int, in_chans: int = 1) -> Any | None:
    """A frozen TorchScript graph computing `model`'s output (logits) for (N, in_chans, image_size, image_size)
    float32 batches (any N), or None when the model cannot be traced and frozen or the graph's output differs
    from the eager module's by more than `PARITY_ATOL` on a random batch of 3, and for a model in training mode or
    on a GPU. `model` is left unchanged."""
    if model.training or any(p.device.type != "cpu" for p in model.parameters()):
        return None  # a model being trained, or on a GPU: the eager module stays
    example = torch.zeros(2, in_chans, image_size, image_size)
    probe = torch.randn(3, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the deprecation notices of torch.jit
            graph = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
            same = torch.allclose(graph(probe).float(), model(probe).float(), atol=PARITY_ATOL, rtol=0)
    except Exception:  # noqa: BLE001  (any tracing or scripting failure: the eager module stays)
        return None
    return graph if same else None


def warm_up(graph: Any, image_size: int, batch_sizes: range | list[int], in_chans: int = 1) -> None:
    """Run `graph` on zero batches of each size, twice: TorchScript profiles each new input shape on its first
    runs (about a second each), which a server would otherwise spend on its first requests of that size."""
    with torch.no_grad():
        for n in batch_sizes:
            for _ in range(2):
                graph(torch.zeros(n, in_chans, image_size, image_size))
