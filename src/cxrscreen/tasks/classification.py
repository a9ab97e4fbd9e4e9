"""Classification at inference: a network that maps a grey image to class logits (N, C).

Probabilities are the softmax of the logits divided by the run's fitted temperature; Grad-CAM draws the
heatmap. Training (cross-entropy recipe, validation figures) is `training.classification`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrscreen.tasks.base import Drawer
from cxrscreen.transforms.preprocess import Geometry, to_model_array

if TYPE_CHECKING:
    from torch import nn

    from cxrscreen.runs.run_dir import LoadedRun

# A torch model on the CPU runs its forward pass this many images at a time, whatever the caller's batch: the
# bundled Lite0 feature-head model at 224 px on 2 threads gave 38-49 images/s at 32 a time and 64-71 at 4-8
# (the frozen graph 51-71 and 76-93), measured on an idle 2-core machine.
CPU_FORWARD_CHUNK = 8


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits (N, C) / temperature, in float64."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class ClassificationTask:
    """Registry kind "classifier" at inference (see the module docstring)."""

    kind = "classifier"
    has_logits = True
    drawing = "heatmap"

    def for_inference(self, model: nn.Module) -> nn.Module:
        import torch

        # channels-last: PyTorch's CPU kernels for depthwise convolutions run about twice as fast in this
        # layout (EfficientNet-Lite0 at 192 px: 32 -> 64 images/s on 2 threads); logits agree within 1e-5
        return model.eval().to(memory_format=torch.channels_last)

    def logits(self, run: LoadedRun, images: Sequence[np.ndarray] | np.ndarray, *, batch_size: int = 64
               ) -> np.ndarray:
        """Logits (N, C), float64, of preprocessed uint8 squares (N, S, S), `batch_size` at a time. A model
        that `takes_numpy` (the ONNX Runtime engine, `predict.onnx_engine`) gets the normalised float32 batch
        as an array, and torch is never imported; a PyTorch model gets it as a tensor on its own device."""
        if not len(images):
            return np.zeros((0, len(run.classes)), np.float64)
        starts = range(0, len(images), batch_size)
        batches = (to_model_array(images[i : i + batch_size], run.preprocess) for i in starts)
        if getattr(run.model, "takes_numpy", False):
            return np.concatenate([np.asarray(run.model(x), np.float64) for x in batches])
        import torch

        run.model.eval()
        device = next(run.model.parameters()).device
        frozen = getattr(run, "frozen", None)  # LoadedRun.with_frozen_graph (CPU only): many images
        model = run.model if frozen is None else frozen
        chunk = CPU_FORWARD_CHUNK if device.type == "cpu" else batch_size
        with torch.no_grad():
            out = [model(t.to(device)).float().cpu() for x in batches for t in torch.from_numpy(x).split(chunk)]
        return torch.cat(out).numpy().astype(np.float64)

    def outputs(self, run: LoadedRun, images: Sequence[np.ndarray] | np.ndarray,
                geometries: Sequence[Geometry] | None = None, *, batch_size: int = 32, calibrated: bool = True
                ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        probs = softmax(self.logits(run, images, batch_size=batch_size), run.temperature if calibrated else 1.0)
        return probs, [{} for _ in range(len(probs))]

    def drawer(self, run: LoadedRun) -> Drawer:
        from cxrscreen.explain.cam import CamDrawer  # pytorch-grad-cam: imported on the first picture

        return CamDrawer(run)
