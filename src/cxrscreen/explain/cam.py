"""Grad-CAM heatmaps (pytorch-grad-cam) mapped back onto the original X-ray, and the overlay PNG.

The CAM is computed on exactly the preprocessed tensor the model classified; `Geometry.to_original`
undoes the resize and the crop or padding, so the overlay has the original image's size and the hot
area lies where the model looked.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cxrscreen.errors import CXRError
from cxrscreen.explain.overlay import overlay, with_band, write_png
from cxrscreen.models.registry import cam_target_layer
from cxrscreen.predict.prepared import Prepared, format_probabilities
from cxrscreen.transforms.preprocess import to_model_array

if TYPE_CHECKING:
    from torch import nn

    from cxrscreen.runs.run_dir import LoadedRun

CAM_MAX_BATCH = 8
"""Most images in one Grad-CAM forward + backward pass (bounds its memory: the target layer's activations and
gradients, and the model's activations after it, for this many images)."""


@contextmanager
def gradients_from(layer: nn.Module) -> Iterator[None]:
    """Record the autograd graph only from `layer`'s output on, in this thread.

    Grad-CAM needs d(class score)/d(layer output) and nothing else; the layer's output is the same tensor with
    or without a graph behind it, and the gradient reaching it runs only through the operations after it, so the
    CAM is unchanged. Everything before the layer then runs without a graph (no saved activations), and the
    backward pass stops at the layer instead of running through the whole backbone and its weight gradients
    (the bundled model at 224 px: 0.55 of 0.8 s per image went to that). Grad mode is thread-local: forward
    passes in other threads are unaffected; it is restored on exit.
    """

    def start_graph(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(True)
        # a fresh graph root; the clone lets later in-place operations (an in-place ReLU) modify it as before
        return output.detach().requires_grad_(True).clone()

    handle = layer.register_forward_hook(start_graph, prepend=True)  # before Grad-CAM's own hooks read it
    try:
        with torch.no_grad():
            yield
    finally:
        handle.remove()


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
        self._lungs_lock = threading.Lock()  # the bundled segmenter is loaded once, whichever thread asks first

    def cam(self, image_u8: np.ndarray, target: str) -> np.ndarray:
        """Grad-CAM of class `target` on one preprocessed uint8 image: float32 (S, S) in [0, 1]."""
        return self.cams([image_u8], [target])[0]

    def cams(self, images_u8: Sequence[np.ndarray], targets: Sequence[str], *, batch_size: int = CAM_MAX_BATCH
             ) -> list[np.ndarray]:
        """Grad-CAM of each preprocessed uint8 image (S, S) for its own class in `targets`, `batch_size` images
        per forward + backward pass: float32 (S, S) maps in [0, 1], each equal to `cam` of that image alone
        (pytorch-grad-cam sums the per-item class scores, whose gradients do not mix in an eval-mode network,
        and scales each map by its own min and max)."""
        if len(images_u8) != len(targets):
            raise ValueError(f"{len(images_u8)} images but {len(targets)} targets")
        for target in targets:
            if target not in self.run.classes:
                raise CXRError(f"unknown target class {target!r}; classes: {', '.join(self.run.classes)}")
        device = next(self.run.model.parameters()).device
        out: list[np.ndarray] = []
        for i in range(0, len(images_u8), max(1, batch_size)):
            x = torch.from_numpy(to_model_array(list(images_u8[i : i + batch_size]), self.run.preprocess))
            ids = [ClassifierOutputTarget(self.run.classes.index(t)) for t in targets[i : i + batch_size]]
            with gradients_from(self.layer), GradCAM(model=self.run.model, target_layers=[self.layer]) as cam:
                heat = cam(input_tensor=x.to(device), targets=ids)
            out.extend(np.nan_to_num(h.astype(np.float32)) for h in heat)
        self.run.model.eval()
        return out

    def heatmap(self, prep: Prepared, target: str, *, cam: np.ndarray | None = None) -> np.ndarray:
        """Grad-CAM mapped onto the original image grid: float32 (H, W) in [0, 1], 0 outside the crop.
        `cam`: the input's Grad-CAM in model space when already computed (`cams`), else computed here."""
        return prep.geometry.to_original(self.cam(prep.image, target) if cam is None else cam, fill=0.0)

    def lung_mask(self, prep: Prepared) -> np.ndarray | None:
        """The label map of the input's lungs (original size), None without a segmenter."""
        if self._lungs is False:
            return None
        with self._lungs_lock:
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
                caption: bool = True, cam: np.ndarray | None = None) -> np.ndarray:
        """The X-ray + CAM overlay (BGR uint8, the X-ray at its original size) with, when `caption`, the class,
        probabilities and heat share inside the lungs in a band above the X-ray and, for a result with
        severity, the six zones' scores in a band below (nothing drawn over the lungs). Sets
        result["heatmap_in_lungs"]. CXRError for a result without probabilities (an input the gate flagged:
        there is no diagnosis to explain). `cam`: the Grad-CAM of `target` in model space when already computed
        (`cams`, batched), so that drawing needs no model pass."""
        if not result.get("probabilities"):
            raise CXRError("no heatmap for an input without a diagnosis", prep.path)
        target = target or result.get("class") or max(result["probabilities"], key=result["probabilities"].get)
        heat = self.heatmap(prep, target, cam=cam)
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


class CamDrawer:
    """A classifier's `tasks.base.Drawer`: `explain` computes the Grad-CAM maps of several inputs in batched
    passes (the only part that runs the model), `__call__` draws one picture (`Explainer.picture`) from its map,
    or computes the map itself when given none."""

    def __init__(self, run: LoadedRun) -> None:
        self.explainer = Explainer(run)

    def explain(self, preps: Sequence[Prepared], targets: Sequence[str]) -> list[np.ndarray]:
        """Grad-CAM maps (S, S) of the inputs, each for its own target class (`Explainer.cams`)."""
        return self.explainer.cams([p.image for p in preps], targets)

    def __call__(self, prep: Prepared, result: dict[str, Any], target: str | None, *, caption: bool = True,
                 explanation: np.ndarray | None = None) -> np.ndarray:
        return self.explainer.picture(prep, result, target=target, caption=caption, cam=explanation)


def hot_centroid(heat: np.ndarray, quantile: float = 0.9) -> tuple[float, float]:
    """(x, y) centroid of the pixels above the given quantile of a heat map (for tests and reports)."""
    thr = np.quantile(heat, quantile)
    ys, xs = np.nonzero(heat >= thr)
    return float(xs.mean()), float(ys.mean())

