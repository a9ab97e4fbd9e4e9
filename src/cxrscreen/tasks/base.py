"""The seam between prediction and a kind of model: what a task owns at inference, so nothing else branches on kind.

A task (classification, detection) owns how its model turns preprocessed images into class probabilities and
extra result fields, what its trained model offers (logits for calibration, Grad-CAM and the audit), and how a
prediction is drawn. Tasks are looked up by the `kind` a registry spec or a run's config.json names
(`cxrscreen.tasks.task_for`). Training each kind (recipe, datasets, loss, validation) is the other side of the
seam, in `cxrscreen.training.tasks`; nothing here imports training code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cxrscreen.transforms.preprocess import Geometry

if TYPE_CHECKING:
    from torch import nn

    from cxrscreen.predict.prepared import Prepared
    from cxrscreen.runs.run_dir import LoadedRun



class Drawer(Protocol):
    """draw(prepared, result, target, caption=True) -> the picture of one prediction: BGR uint8 (H', W', 3), the
    X-ray at its original size with the task's drawing on it (Grad-CAM heat, detection boxes), a caption band
    above it when `caption` (the kind's own text: class, probabilities), and a band of the six zones' scores below
    it when the result has severity. Nothing is written: the CLI writes it as PNG (`explain.overlay.write_png`),
    the server encodes it (`explain.overlay.png_base64`). May set result fields (a classifier's
    "heatmap_in_lungs"). `target`: the class a heatmap explains (None: the result's class). `explanation`: this
    input's item of `explain` when the caller computed it (batched), else the drawer computes it itself."""

    def explain(self, preps: Sequence[Prepared], targets: Sequence[str]) -> list[Any]:
        """The part of the pictures of several inputs that runs the model, in batched passes (a classifier's
        Grad-CAM maps; None per input for a drawing that needs no model pass), one item per input. The server
        calls it for the heatmap requests waiting together, under its model lock, then draws each picture
        outside the lock with `explanation=` its item."""

    def __call__(self, prep: Prepared, result: dict[str, Any], target: str | None, *, caption: bool = True,
                 explanation: Any = None) -> np.ndarray: ...


class Task(Protocol):
    """A kind of model at inference. `has_logits`: the model maps images to class logits (N, C), which
    calibration, Grad-CAM and the shortcut audit need. `drawing`: what `predict --heatmap` writes ("heatmap" or
    "boxes")."""

    kind: str
    has_logits: bool
    drawing: str

    def for_inference(self, model: nn.Module) -> nn.Module:
        """The loaded model prepared for inference (eval mode; a faster memory layout where one helps)."""

    def logits(self, run: LoadedRun, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Uncalibrated logits (N, C) of preprocessed uint8 images (N, S, S); CXRError where none exist."""

    def outputs(
        self,
        run: LoadedRun,
        images: Sequence[np.ndarray] | np.ndarray,
        geometries: Sequence[Geometry] | None = None,
        *,
        batch_size: int = 32,
        calibrated: bool = True,
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Class probabilities (N, C) of preprocessed uint8 images and, per image, the task's extra result
        fields (detectors: "boxes" in original pixels, given the images' geometries)."""

    def drawer(self, run: LoadedRun) -> Drawer:
        """The task's `Drawer`: the picture of a prediction for `predict --heatmap`, the server and the PACS
        output (CXRError where this model or engine cannot draw)."""
