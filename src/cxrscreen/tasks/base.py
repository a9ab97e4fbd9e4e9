"""The seam between the package and a kind of model: what a task owns, so that nothing else branches on kind.

A task (classification, detection) owns its training recipe (dataset, loss, step, validation), how its
model turns preprocessed images into class probabilities and extra result fields, what its trained model
offers (logits for calibration, Grad-CAM and the audit), and how a prediction is drawn. Tasks are looked
up by the `kind` a registry spec or a run's config.json names (`cxrscreen.tasks.task_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from cxrscreen.data.subsets import SubsetData
from cxrscreen.engine.distributed import DistContext
from cxrscreen.engine.loop import Recipe
from cxrscreen.transforms.preprocess import Geometry

if TYPE_CHECKING:
    from cxrscreen.predict.predictor import Prepared
    from cxrscreen.runs.run_dir import LoadedRun
    from cxrscreen.training.config import TrainConfig

Drawer = Callable[["Prepared", dict[str, Any], Path, "str | None"], Path]


@dataclass
class TrainContext:
    """What a task's recipe is built from: the config, the loaded train and val subsets, and the run."""

    cfg: TrainConfig
    train: SubsetData
    val: SubsetData
    classes: list[str]
    device: torch.device
    generator: torch.Generator
    data_dir: Path
    out_dir: Path
    log: Callable[[str], None]
    ddp: DistContext = field(default_factory=DistContext)  # a distributed run's process (one process: no-op)


class Task(Protocol):
    """A kind of model. `has_logits`: the model maps images to class logits (N, C), which calibration,
    Grad-CAM and the shortcut audit need. `drawing`: what `predict --heatmap` writes ("heatmap" or "boxes")."""

    kind: str
    has_logits: bool
    drawing: str

    def check_config(self, cfg: TrainConfig, out_dir: Path) -> None:
        """CXRError for a config this task cannot train, before any image is loaded."""

    def recipe(self, ctx: TrainContext) -> Recipe:
        """Model, optimiser, batches, loss and validation of one training run; task fields in `config`."""

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
        """draw(prepared, result, out_path, target) -> the PNG written for `predict --heatmap`."""
