"""The ONNX Runtime engine: a classifier exported to .onnx predicts without torch (numpy in, numpy out).

`predict.onnx_export.export_onnx(run, "model.onnx")` writes a self-contained model file:

- graph input ``image``: float32 (N, 1, S, S), the normalised grey image of
  `transforms.to_model_tensor` (``(u8 / 255 - mean) / std``), N dynamic;
- graph outputs ``logits`` (N, C) and ``probabilities`` (N, C) = softmax(logits / temperature), so a
  consumer without cxrscreen gets calibrated probabilities too;
- ``metadata_props`` (strings, JSON where structured): ``cxrscreen.config`` (the run's whole config.json,
  with its chosen decision rule written into ``decision``), ``cxrscreen.classes``, ``cxrscreen.preprocess``,
  ``cxrscreen.temperature``, ``cxrscreen.decision``, ``cxrscreen.input`` (the input contract in words),
  ``cxrscreen.weights_sha256`` (the weights it was exported from) and, when the run has one,
  ``cxrscreen.gate`` (the input gate's parameters).

The .onnx file alone is enough to predict and to serve: `load_onnx_run(path)` reads everything from the
metadata and returns a `LoadedRun` whose `model` runs the graph in ONNX Runtime (:class:`OnnxModel`), so
`Predictor` and the web app use it unchanged; nothing on that path imports torch. What is exported is the
run as it is at export time: a run calibrated afterwards needs a new export. Grad-CAM needs gradients: it runs on
the PyTorch model the export was made from when its weights lie beside the .onnx file (a run directory holding
model.onnx, the bundled model), loaded on the first heatmap (`OnnxLoadedRun.pytorch_run`, `drawing_run`); the class
and probabilities stay ONNX Runtime's. A bare .onnx file draws no heatmap. The bundled model ships its export
(`weights/model.onnx`, its sha256 in the bundle's config.json as ``onnx_sha256``), so `--engine onnxruntime` needs
no export step.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.runs.run_dir import LoadedRun

ENGINES = ("torch", "onnxruntime")
DEFAULT_OPSET = 17
"""ONNX opset of the export: well inside what onnxruntime 1.32 runs (it supports opsets up to 23)."""
ONNX_FILE = "model.onnx"
META_PREFIX = "cxrscreen."
INPUT_NAME, LOGITS_NAME, PROBS_NAME = "image", "logits", "probabilities"


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise CXRError(f"the ONNX engine needs the package {module!r}: pip install -e '.[onnx]'") from exc


def export_metadata_keys(path: str | Path) -> list[str]:
    """The metadata_props keys of an .onnx file."""
    return list(read_onnx_metadata(path))


def _session(path: Path, threads: int | None) -> Any:
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting between ops: spinning threads took the cores from the decode workers and from PyTorch
    # in the same process (docs/results/batch_predict_ort_spinning.json: 2 workers on 2 cores, ONNX Runtime
    # 42 img/s against PyTorch's 52; docs/results/batch_predict.json is the run without spinning)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own exception types for unreadable models
        raise CXRError(f"ONNX Runtime cannot load this model ({type(exc).__name__}: {exc})", path) from exc


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The cxrscreen.* metadata of an .onnx file, prefix stripped; CXRError when it is no cxrscreen export."""
    path = Path(path)
    if not path.is_file():
        raise CXRError("ONNX model file not found", path)
    meta = _session(path, 1).get_modelmeta().custom_metadata_map
    out = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
    missing = {"config", "classes", "preprocess", "temperature", "decision"} - set(out)
    if missing:
        raise CXRError(f"not a cxrscreen ONNX export (metadata lacks {', '.join(sorted(missing))}); "
                       "export it with `cxrscreen export --format onnx`", path)
    return out


class OnnxModel:
    """An ONNX Runtime session in the place of a PyTorch model: float32 (N, 1, S, S) array -> logits (N, C).

    `takes_numpy` tells the classification task to hand it numpy batches (`tasks.classification`), so that
    predicting with it imports no torch. Runs on the CPU execution provider; `threads`: intra-op threads
    (None: ONNX Runtime's default, one per core).
    """

    takes_numpy = True

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs of the graph for a float32 (N, 1, S, S) array."""
        outs = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.output_names, outs, strict=True))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[LOGITS_NAME]


@dataclass
class OnnxLoadedRun(LoadedRun):
    """A LoadedRun read from an .onnx file: `model` is an OnnxModel, `embedded_gate` the gate it carries,
    `threads` the intra-op threads it was loaded with (also given to PyTorch when Grad-CAM loads it)."""

    embedded_gate: Any = None
    threads: int | None = None
    _pytorch: LoadedRun | None = field(default=None, init=False, repr=False)
    _pytorch_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def onnx_file(self) -> Path:
        return Path(self.config["engine"]["onnx_file"])

    def pytorch_problem(self) -> str | None:
        """Why no PyTorch model can draw this export's heatmaps (None: its weights lie beside it, in a run
        directory whose config.json records the weights the export was made from). Reads config.json only."""
        from cxrscreen.runs.run_dir import WEIGHTS_FILE

        folder = self.run_dir
        missing = [n for n in (WEIGHTS_FILE, "config.json") if not (folder / n).is_file()]
        if missing:
            return (f"heatmaps (Grad-CAM) need the PyTorch engine or the PyTorch weights beside the ONNX export "
                    f"({' and '.join(missing)} missing in {folder}); this is a bare .onnx file")
        try:
            beside = json.loads((folder / "config.json").read_text()).get("weights_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            return f"heatmaps (Grad-CAM): the config.json beside the ONNX export is unreadable ({exc})"
        exported = self.config.get("weights_sha256")
        if exported and beside != exported:
            return (f"heatmaps (Grad-CAM): the PyTorch weights beside the ONNX export (sha256 {str(beside)[:12]}) "
                    f"are not the ones it was exported from ({str(exported)[:12]}); export it again")
        return None

    def pytorch_run(self) -> LoadedRun:
        """The PyTorch run this export was made from (the weights beside the .onnx file, sha256-checked by
        `load_run`), loaded on the first call, once, whichever thread asks first: what Grad-CAM runs on.
        CXRError when there is none (`pytorch_problem`) or it does not match the export's classes and
        preprocessing."""
        with self._pytorch_lock:
            if self._pytorch is None:
                problem = self.pytorch_problem()
                if problem is not None:
                    raise CXRError(problem, self.onnx_file)
                from cxrscreen.runs.run_dir import load_run

                if self.threads:
                    import torch

                    torch.set_num_threads(max(1, int(self.threads)))
                run = load_run(self.run_dir)
                if run.classes != self.classes or run.preprocess != self.preprocess:
                    raise CXRError("heatmaps (Grad-CAM): the PyTorch run beside the ONNX export has other classes "
                                   "or preprocessing; export it again", self.onnx_file)
                self._pytorch = run
            return self._pytorch


def drawing_run(run: LoadedRun) -> LoadedRun:
    """The run whose model draws the pictures of `run`'s predictions: `run` itself, or for an ONNX Runtime
    classifier the PyTorch run its export was made from (Grad-CAM needs gradients), loaded on the first call
    (torch is imported then, never for classification). CXRError with the reason for a bare .onnx file."""
    if isinstance(run, OnnxLoadedRun) and run.task.drawing == "heatmap":
        return run.pytorch_run()
    return run


def heatmap_problem(run: LoadedRun) -> str | None:
    """Why `run` cannot draw heatmaps with its engine (None when it can); loads nothing."""
    if isinstance(run, OnnxLoadedRun) and run.task.drawing == "heatmap":
        return run.pytorch_problem()
    return None


def load_onnx_run(path: str | Path, *, threads: int | None = None) -> OnnxLoadedRun:
    """An .onnx export (or a folder holding model.onnx) as a LoadedRun for Predictor and the web app."""
    path = Path(path)
    if path.is_dir():
        path = path / ONNX_FILE
    meta = read_onnx_metadata(path)
    try:
        config = json.loads(meta["config"])
        config["classes"] = json.loads(meta["classes"])
        config["preprocess"] = json.loads(meta["preprocess"])
        config["decision"] = json.loads(meta["decision"])
        config.setdefault("calibration", {})
        config["calibration"] = {**(config["calibration"] or {}), "temperature": float(meta["temperature"])}
    except (ValueError, TypeError) as exc:
        raise CXRError(f"broken cxrscreen metadata in the ONNX model ({exc})", path) from exc
    config["engine"] = {"name": "onnxruntime", "onnx_file": str(path)}
    run = OnnxLoadedRun(model=OnnxModel(path, threads=threads), config=config, run_dir=path.parent, threads=threads)
    if "gate" in meta:
        from cxrscreen.gate.model import Gate

        try:
            run.embedded_gate = Gate.from_dict(json.loads(meta["gate"]))
        except ValueError as exc:
            raise CXRError(f"cannot load the input gate stored in the ONNX model ({exc})", path) from exc
    return run


def load_bundled_onnx(folder: Path, *, threads: int | None = None) -> OnnxLoadedRun:
    """The bundled model's ONNX export, its sha256 checked against the bundle's config.json (`onnx_sha256`)."""
    from cxrscreen.io.files import file_sha256

    path = Path(folder) / ONNX_FILE
    if not path.is_file():
        raise CXRError("the bundled model has no ONNX export in this installation; pass --model FILE.onnx "
                       "(make one with `cxrscreen export`)", path)
    expected = json.loads((Path(folder) / "config.json").read_text()).get("onnx_sha256")
    actual = file_sha256(path)
    if expected != actual:
        raise CXRError(f"ONNX checksum mismatch: sha256 is {actual}, the bundle's config.json expects {expected}; "
                       "the file is corrupt or was replaced, and will not be loaded", path)
    return load_onnx_run(path, threads=threads)


def load_for_engine(model: str | Path | None, engine: str = "torch", *, threads: int | None = None) -> LoadedRun:
    """The model to predict with: a run directory (or the bundled model when None) for engine "torch"; an
    .onnx file, or a folder holding model.onnx (the bundled model's export when None), for engine
    "onnxruntime"."""
    from cxrscreen.predict.predictor import default_model_dir, load_model

    if engine == "torch":
        if model is not None and Path(model).suffix == ".onnx":
            raise CXRError("an .onnx file runs with --engine onnxruntime", model)
        return load_model(model)
    if engine == "onnxruntime":
        if model is None:
            return load_bundled_onnx(default_model_dir(), threads=threads)
        return load_onnx_run(model, threads=threads)
    raise CXRError(f"unknown engine {engine!r}; use {' or '.join(ENGINES)}")
