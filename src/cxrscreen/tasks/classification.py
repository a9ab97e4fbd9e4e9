"""Classification at inference: a network that maps a grey image to class logits (N, C).

Probabilities are the softmax of the logits divided by the run's fitted temperature; Grad-CAM draws the
heatmap. Training (cross-entropy recipe, validation figures) is `training.classification`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cxrscreen.tasks.base import Drawer
from cxrscreen.transforms.preprocess import Geometry, to_model_tensor

if TYPE_CHECKING:
    from cxrscreen.runs.run_dir import LoadedRun


class ClassificationTask:
    """Registry kind "classifier" at inference (see the module docstring)."""

    kind = "classifier"
    has_logits = True
    drawing = "heatmap"

    def for_inference(self, model: nn.Module) -> nn.Module:
        # channels-last: PyTorch's CPU kernels for depthwise convolutions run about twice as fast in this
        # layout (EfficientNet-Lite0 at 192 px: 32 -> 64 images/s on 2 threads); logits agree within 1e-5
        return model.eval().to(memory_format=torch.channels_last)

    @torch.no_grad()
    def logits(self, run: LoadedRun, images: Sequence[np.ndarray] | np.ndarray, *, batch_size: int = 64
               ) -> np.ndarray:
        run.model.eval()
        # a model without parameters (the ONNX Runtime engine, `predict.onnx_engine`) takes CPU tensors
        device = next(run.model.parameters(), torch.empty(0)).device
        out = [run.model(torch.stack([to_model_tensor(im, run.preprocess) for im in images[i : i + batch_size]])
                         .to(device)).float().cpu()
               for i in range(0, len(images), batch_size)]
        if not out:
            return np.zeros((0, len(run.classes)), np.float64)
        return torch.cat(out).numpy().astype(np.float64)

    def outputs(self, run: LoadedRun, images: Sequence[np.ndarray] | np.ndarray,
                geometries: Sequence[Geometry] | None = None, *, batch_size: int = 32, calibrated: bool = True
                ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        t = run.temperature if calibrated else 1.0
        probs = torch.softmax(torch.from_numpy(self.logits(run, images, batch_size=batch_size)) / t, 1).numpy()
        return probs, [{} for _ in range(len(probs))]

    def drawer(self, run: LoadedRun) -> Drawer:
        from cxrscreen.explain.cam import Explainer

        explainer = Explainer(run)

        def draw(prep: Any, result: dict[str, Any], out_path: Path, target: str | None) -> Path:
            return explainer.write_overlay(prep, result, out_path.parent, target=target, out_path=out_path)

        return draw
