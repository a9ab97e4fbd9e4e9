"""The run directory: weights (safetensors), config.json, history.csv, checkpoint.pt, eval/*.json.

config.json is the contract that evaluate, predict, explain and the web app read: architecture,
classes, preprocessing, training arguments, seed, package versions, data and split hashes, the
sha256 of the weights, and (once fitted) calibration and the operating point.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha256, write_json
from cxrscreen.runs.decision import DecisionRule
from cxrscreen.transforms.preprocess import PreprocessConfig

if TYPE_CHECKING:  # torch, safetensors and the registry load with a PyTorch model, not with the ONNX engine
    import pandas as pd
    import torch
    from torch import nn

    from cxrscreen.tasks.base import Task

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint.pt"


def save_weights(model: nn.Module, run_dir: Path, *, dtype: torch.dtype | None = None) -> str:
    """Write model.safetensors (contiguous CPU tensors) and return its sha256.

    dtype: store floating-point tensors in this type (e.g. torch.float16 to halve a bundled file);
    load_run casts them back to the model's own type.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path = Path(run_dir) / WEIGHTS_FILE
    save_file(state, str(path))
    return file_sha256(path)


def run_config(
    *,
    kind: str,
    arch: str,
    classes: list[str],
    preprocess: PreprocessConfig,
    training: dict[str, Any],
    seed: int,
    data: dict[str, Any],
    **fields: Any,
) -> dict[str, Any]:
    """The one schema of a run directory's config.json (trained runs and the lung localizer): what the
    model is (kind, arch, classes, preprocessing), how it was trained (training options, seed), on what
    (data: manifest and split hashes, image counts), with what (versions, command, time), then `fields`."""
    from cxrscreen.runs.provenance import provenance

    return {"arch": arch, "kind": kind, "classes": list(classes), "preprocess": preprocess.to_dict(),
            "training": training, "seed": seed, **provenance(), "data": data, **fields}


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write config.json atomically."""
    write_json(Path(run_dir) / CONFIG_FILE, config)


def read_config(run_dir: Path) -> dict[str, Any]:
    """Read config.json; CXRError naming the directory when it is missing or broken."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CXRError("not a cxrscreen run directory (no config.json)", run_dir)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CXRError(f"config.json is not valid JSON ({exc})", path) from exc


@dataclass
class LoadedRun:
    """A model ready for inference and the configuration it was trained with."""

    model: Any  # a torch nn.Module, or the ONNX Runtime engine's model (numpy in, numpy out)
    config: dict[str, Any]
    run_dir: Path
    preprocess: PreprocessConfig = field(init=False)
    frozen: Any = field(default=None, init=False, repr=False)  # see with_frozen_graph()

    def __post_init__(self) -> None:
        self.preprocess = PreprocessConfig.from_dict(self.config["preprocess"])

    @property
    def arch(self) -> str:
        return self.config["arch"]

    @property
    def kind(self) -> str:
        return str(self.config.get("kind", "classifier"))

    @property
    def task(self) -> Task:
        """The task of this run's kind (`cxrscreen.tasks`): its probabilities, result fields, drawing."""
        from cxrscreen.tasks import task_for

        return task_for(self.kind)

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"])

    def with_frozen_graph(self) -> LoadedRun:
        """This run, computing its classifier logits with a frozen TorchScript graph (`models.frozen`: faster on
        the CPU for many images; Grad-CAM keeps the eager `model`): a shallow copy sharing model and config, so
        other users of this run keep the eager module. `self` for another kind, the ONNX Runtime engine, or a model
        that `freeze_for_inference` does not freeze (on a GPU, or one that does not trace)."""
        if self.frozen is not None or self.kind != "classifier" or getattr(self.model, "takes_numpy", False):
            return self
        from cxrscreen.models.frozen import freeze_for_inference

        graph = freeze_for_inference(self.model, self.preprocess.image_size)
        if graph is None:
            return self
        run = copy.copy(self)
        run.frozen = graph
        return run

    @property
    def temperature(self) -> float:
        return float((self.config.get("calibration") or {}).get("temperature", 1.0))

    @property
    def covid_threshold(self) -> float | None:
        op = self.config.get("operating_point") or {}
        return op.get("threshold")

    def decision_rule(self, *, argmax: bool = False, threshold: float | None = None) -> DecisionRule:
        """The rule that turns this model's probabilities into a class: `threshold` when given, arg-max when
        asked, else the run's chosen rule (config "decision", written by `calibrate`), else the stored COVID
        operating point (runs calibrated before "decision" existed), else arg-max."""
        if threshold is not None:
            return DecisionRule(threshold=threshold)
        if argmax:
            return DecisionRule()
        if "decision" in self.config:
            return DecisionRule.from_dict(self.config["decision"])
        return DecisionRule(threshold=self.covid_threshold)


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> LoadedRun:
    """Build the architecture named in config.json and load its weights.

    The weights' sha256 is checked against the one recorded in config.json; a mismatch is refused.
    Classifiers are returned in eval mode with channels-last weights (faster on the CPU, same outputs).
    """
    from safetensors.torch import load_file

    from cxrscreen.models.registry import create_model

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    wpath = run_dir / WEIGHTS_FILE
    if not wpath.is_file():
        raise CXRError(f"no {WEIGHTS_FILE} in the run directory", run_dir)
    expected = config.get("weights_sha256")
    if expected:
        actual = file_sha256(wpath)
        if actual != expected:
            raise CXRError(
                f"weights checksum mismatch: sha256 is {actual}, config.json expects {expected}; "
                "the file is corrupt or was replaced, and will not be loaded",
                wpath,
            )
    model = create_model(config["arch"], num_classes=len(config["classes"]), in_chans=1, weights=None,
                         options=config.get("model_options"))
    try:
        state = load_file(str(wpath))
        model.load_state_dict(state)
    except Exception as exc:  # safetensors header errors, shape mismatches
        raise CXRError(f"weights do not load into {config['arch']} ({exc})", wpath) from exc
    run = LoadedRun(model=model.eval().to(device), config=config, run_dir=run_dir)
    run.model = run.task.for_inference(run.model)
    return run


def read_history(path: Path) -> pd.DataFrame:
    """history.csv as numbers (blank cells NaN); empty frame when missing."""
    import pandas as pd

    if not path.is_file():
        return pd.DataFrame()
    return pd.read_csv(path).apply(pd.to_numeric, errors="coerce")

