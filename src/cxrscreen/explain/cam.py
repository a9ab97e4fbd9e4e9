"""Grad-CAM heatmaps (pytorch-grad-cam) mapped back onto the original X-ray, and the overlay PNG.

The CAM is computed on exactly the preprocessed tensor the model classified; `Geometry.to_original`
undoes the resize and the crop or padding, so the overlay has the original image's size and the hot
area lies where the model looked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxrscreen.errors import CXRError
from cxrscreen.explain.overlay import draw_text, overlay, write_png
from cxrscreen.models.registry import cam_target_layer
from cxrscreen.predict.prepared import Prepared, format_probabilities
from cxrscreen.transforms.preprocess import to_model_tensor

if TYPE_CHECKING:
    from cxrscreen.runs.run_dir import LoadedRun


class Explainer:
    """Grad-CAM for a loaded classifier; the target layer is the run's config.json `cam_layer` when it names one,
    else the model registry's default for the architecture."""

    def __init__(self, run: LoadedRun) -> None:
        if not run.task.has_logits:
            raise CXRError(f"heatmaps are for classifiers; {run.arch} is a {run.kind}")
        self.run = run
        self.layer = cam_target_layer(run.arch, run.model, run.config.get("cam_layer"))

    def cam(self, image_u8: np.ndarray, target: str) -> np.ndarray:
        """Grad-CAM of class `target` on one preprocessed uint8 image: float32 (S, S) in [0, 1]."""
        if target not in self.run.classes:
            raise CXRError(f"unknown target class {target!r}; classes: {', '.join(self.run.classes)}")
        x = to_model_tensor(image_u8, self.run.preprocess).unsqueeze(0)
        x = x.to(next(self.run.model.parameters()).device)
        with GradCAM(model=self.run.model, target_layers=[self.layer]) as cam:
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(self.run.classes.index(target))])
        self.run.model.eval()
        return np.nan_to_num(heat[0].astype(np.float32))

    def heatmap(self, prep: Prepared, target: str) -> np.ndarray:
        """Grad-CAM mapped onto the original image grid: float32 (H, W) in [0, 1], 0 outside the crop."""
        return prep.geometry.to_original(self.cam(prep.image, target), fill=0.0)

    def write_overlay(self, prep: Prepared, result: dict[str, Any], out_dir: Path, *,
                      target: str | None = None, out_path: Path | None = None) -> Path:
        """Write the X-ray + CAM overlay + class and probabilities to `out_path` (default:
        <out_dir>/<stem>_heatmap.png). Returns the path. CXRError for a result without probabilities
        (an input the gate flagged: there is no diagnosis to explain)."""
        if not result.get("probabilities"):
            raise CXRError("no heatmap for an input without a diagnosis", prep.path)
        target = target or result.get("class") or max(result["probabilities"], key=result["probabilities"].get)
        heat = self.heatmap(prep, target)
        img = overlay(prep.xray.pixels, heat)
        label = result.get("class") or "no diagnosis"
        lines = [f"{label}  (heatmap: {target})", format_probabilities(result["probabilities"])]
        draw_text(img, lines)
        out = Path(out_path) if out_path is not None else Path(out_dir) / f"{Path(prep.path).stem}_heatmap.png"
        return write_png(img, out)


def hot_centroid(heat: np.ndarray, quantile: float = 0.9) -> tuple[float, float]:
    """(x, y) centroid of the pixels above the given quantile of a heat map (for tests and reports)."""
    thr = np.quantile(heat, quantile)
    ys, xs = np.nonzero(heat >= thr)
    return float(xs.mean()), float(ys.mean())

