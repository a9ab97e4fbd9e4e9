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
from cxrscreen.explain.overlay import overlay, with_band, write_png
from cxrscreen.models.registry import cam_target_layer
from cxrscreen.predict.prepared import Prepared, format_probabilities
from cxrscreen.transforms.preprocess import to_model_tensor

if TYPE_CHECKING:
    from cxrscreen.runs.run_dir import LoadedRun


class Explainer:
    """Grad-CAM for a loaded classifier. The target layer: `layer` when given, else the run config's
    ``cam_layer``, else the registry default for the architecture. `lungs`: a LungSegmenter for the share of
    heat inside the lungs (None: the bundled one, loaded on first use; False: none)."""

    def __init__(self, run: LoadedRun, *, layer: str | None = None, lungs: Any = None) -> None:
        if not run.task.has_logits:
            raise CXRError(f"heatmaps are for classifiers; {run.arch} is a {run.kind}")
        self.run = run
        self.layer_name = layer or run.config.get("cam_layer")
        self.layer = cam_target_layer(run.arch, run.model, self.layer_name)
        self._lungs = lungs

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

    def lung_mask(self, prep: Prepared) -> np.ndarray | None:
        """The label map of the input's lungs (original size), None without a segmenter."""
        if self._lungs is False:
            return None
        if self._lungs is None:
            from cxrscreen.lungs.segmenter import bundled_segmenter

            self._lungs = bundled_segmenter()
        return self._lungs.segment(prep.xray.pixels).mask

    def in_lungs(self, heat: np.ndarray, prep: Prepared) -> float | None:
        """Share (0-1) of the heat map's mass inside the segmented lungs; None without a segmenter or heat."""
        from cxrscreen.lungs.masks import heat_share_inside

        mask = self.lung_mask(prep)
        return None if mask is None else heat_share_inside(heat, mask > 0)

    def picture(self, prep: Prepared, result: dict[str, Any], *, target: str | None = None,
                caption: bool = True) -> np.ndarray:
        """The X-ray + CAM overlay (BGR uint8, the X-ray at its original size) with, when `caption`, the class,
        probabilities and heat share inside the lungs in a band above the X-ray and, for a result with
        severity, the six zones' scores in a band below (nothing drawn over the lungs). Sets
        result["heatmap_in_lungs"]. CXRError for a result without probabilities (an input the gate flagged:
        there is no diagnosis to explain)."""
        if not result.get("probabilities"):
            raise CXRError("no heatmap for an input without a diagnosis", prep.path)
        target = target or result.get("class") or max(result["probabilities"], key=result["probabilities"].get)
        heat = self.heatmap(prep, target)
        share = self.in_lungs(heat, prep)
        result["heatmap_in_lungs"] = None if share is None else round(share, 4)
        img = overlay(prep.xray.pixels, heat)
        if caption:
            label = result.get("class") or "no diagnosis"
            lines = [f"{label}  (heatmap: {target})", format_probabilities(result["probabilities"])]
            if share is not None:
                lines.append(f"heat inside the lungs: {100 * share:.0f} %")
            img = with_band(img, lines, where="top")
        from cxrscreen.severity.zones import with_zones

        return with_zones(img, result)

    def write_overlay(self, prep: Prepared, result: dict[str, Any], out_dir: Path, *,
                      target: str | None = None, out_path: Path | None = None) -> Path:
        """Write `picture(prep, result, target=target)` as PNG to `out_path` (default:
        <out_dir>/<stem>_heatmap.png); returns the path."""
        img = self.picture(prep, result, target=target)
        out = Path(out_path) if out_path is not None else Path(out_dir) / f"{Path(prep.path).stem}_heatmap.png"
        return write_png(img, out)


def hot_centroid(heat: np.ndarray, quantile: float = 0.9) -> tuple[float, float]:
    """(x, y) centroid of the pixels above the given quantile of a heat map (for tests and reports)."""
    thr = np.quantile(heat, quantile)
    ys, xs = np.nonzero(heat >= thr)
    return float(xs.mean()), float(ys.mean())

