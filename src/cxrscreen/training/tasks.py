"""The training side of each kind of model: its recipe (model, batches, loss, validation), registered by kind.

`train()` looks the recipe up here by the registry kind of `cfg.arch`; inference (probabilities, result fields,
drawing) is the other side of the seam, `cxrscreen.tasks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from cxrscreen.data.subsets import SubsetData
from cxrscreen.engine.distributed import DistContext
from cxrscreen.engine.loop import Recipe
from cxrscreen.errors import CXRError

if TYPE_CHECKING:
    from cxrscreen.training.config import TrainConfig


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


class TrainingTask(Protocol):
    """How one kind of model is trained by the one epoch loop."""

    kind: str

    def check_config(self, cfg: TrainConfig, out_dir: Path) -> None:
        """CXRError for a config this task cannot train, before any image is loaded."""

    def recipe(self, ctx: TrainContext) -> Recipe:
        """Model, optimiser, batches, loss and validation of one training run; task fields in `config`."""


def training_for(kind: str) -> TrainingTask:
    """The training side of a registry kind (imported on demand: a kind's recipe pulls in its datasets)."""
    if kind == "classifier":
        from cxrscreen.training.classification import ClassificationTraining

        return ClassificationTraining()
    if kind == "detector":
        from cxrscreen.training.detection import DetectionTraining

        return DetectionTraining()
    raise CXRError(f"no training recipe for model kind {kind!r}; trainable: classifier, detector")
