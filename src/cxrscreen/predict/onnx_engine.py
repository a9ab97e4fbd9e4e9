"""ONNX export of a classifier run and the ONNX Runtime engine that predicts with it.

`export_onnx(run, "model.onnx")` writes a self-contained model file:

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
metadata and returns a `LoadedRun` whose `model` runs the graph in ONNX Runtime (:class:`OnnxModule`), so
`Predictor` and the web app use it unchanged. What is exported is the run as it is at export time: a run
calibrated afterwards needs a new export. Grad-CAM needs gradients and stays with the PyTorch engine.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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


class _WithProbabilities(nn.Module):
    """The classifier plus its calibrated softmax: (logits, softmax(logits / T))."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.softmax(logits / self.temperature, dim=1)


def export_metadata(run: LoadedRun) -> dict[str, str]:
    """The metadata_props written into the .onnx file (see the module docstring)."""
    from cxrscreen.gate.model import gate_for_run

    rule = run.decision_rule().to_dict()
    config = {**run.config, "decision": rule}
    pre = run.preprocess
    meta = {
        "config": json.dumps(config, default=str),
        "classes": json.dumps(run.classes),
        "preprocess": json.dumps(pre.to_dict()),
        "temperature": repr(run.temperature),
        "decision": json.dumps(rule),
        "weights_sha256": str(run.config.get("weights_sha256") or ""),
        "input": (f"{INPUT_NAME}: float32 (N, 1, {pre.image_size}, {pre.image_size}) = (grey_u8 / 255 - {pre.mean}) "
                  f"/ {pre.std} after the preprocessing in cxrscreen.preprocess; outputs {LOGITS_NAME} and "
                  f"{PROBS_NAME} = softmax({LOGITS_NAME} / temperature), classes in cxrscreen.classes order"),
    }
    gate = gate_for_run(run)
    if gate is not None:
        meta["gate"] = json.dumps(gate.to_dict())
    return {META_PREFIX + k: v for k, v in meta.items()}


def export_onnx(run: LoadedRun, out_path: str | Path, *, opset: int = DEFAULT_OPSET,
                check_batch: int = 2) -> dict[str, Any]:
    """Export a loaded classifier run to `out_path` (dynamic batch axis, metadata as in the module doc).

    The file is checked with `onnx.checker` and run once in ONNX Runtime on `check_batch` random inputs
    against PyTorch. Returns {path, opset, bytes, max_abs_diff_probabilities, metadata keys}.
    CXRError for a detector run or when the export fails.
    """
    onnx = _require("onnx")
    if not run.task.has_logits:
        raise CXRError(f"ONNX export is for classifiers; {run.arch} is a {run.kind}", run.run_dir)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    size = run.preprocess.image_size
    wrapped = _WithProbabilities(run.model, run.temperature).eval()
    params = list(run.model.parameters())
    device = params[0].device if params else torch.device("cpu")
    example = torch.randn(check_batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    tmp = out_path.with_name(out_path.name + f".{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it needs no onnxscript
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, (example.to(device),), str(tmp), input_names=[INPUT_NAME],
                output_names=[LOGITS_NAME, PROBS_NAME], opset_version=opset, dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, LOGITS_NAME: {0: "batch"}, PROBS_NAME: {0: "batch"}},
            )
        proto = onnx.load(str(tmp))
        for key, value in export_metadata(run).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "cxrscreen"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    except CXRError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # exporter and checker errors come in many types
        tmp.unlink(missing_ok=True)
        raise CXRError(f"ONNX export of {run.arch} failed ({type(exc).__name__}: {exc})", out_path) from exc
    os.replace(tmp, out_path)
    with torch.no_grad():
        expected = wrapped(example.to(device))[1].float().cpu().numpy()
    got = OnnxModule(out_path, threads=1).run(example.numpy())[PROBS_NAME]
    return {"path": str(out_path), "opset": opset, "bytes": out_path.stat().st_size,
            "max_abs_diff_probabilities": float(np.abs(expected - got).max()),
            "metadata_keys": sorted(export_metadata_keys(out_path))}


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


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind the `nn.Module` call the Predictor makes: (N, 1, S, S) -> logits.

    Runs on the CPU execution provider; inputs on another device are copied to the CPU. `threads`: intra-op
    threads (None: ONNX Runtime's default, one per core).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs of the graph for a float32 (N, 1, S, S) array."""
        outs = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.output_names, outs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.detach().cpu().numpy())[LOGITS_NAME])


class OnnxLoadedRun(LoadedRun):
    """A LoadedRun read from an .onnx file: `model` is an OnnxModule, `embedded_gate` the gate it carries."""

    embedded_gate: Any = None


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
    run = OnnxLoadedRun(model=OnnxModule(path, threads=threads), config=config, run_dir=path.parent)
    if "gate" in meta:
        from cxrscreen.gate.model import Gate

        try:
            run.embedded_gate = Gate.from_dict(json.loads(meta["gate"]))
        except ValueError as exc:
            raise CXRError(f"cannot load the input gate stored in the ONNX model ({exc})", path) from exc
    return run


def load_for_engine(model: str | Path | None, engine: str = "torch", *, threads: int | None = None) -> LoadedRun:
    """The model to predict with: a run directory (or the bundled model when None) for engine "torch"; an
    .onnx file, or a folder holding model.onnx, for engine "onnxruntime"."""
    from cxrscreen.predict.predictor import load_model

    if engine == "torch":
        if model is not None and Path(model).suffix == ".onnx":
            raise CXRError("an .onnx file runs with --engine onnxruntime", model)
        return load_model(model)
    if engine == "onnxruntime":
        if model is None:
            raise CXRError("--engine onnxruntime needs --model FILE.onnx (make one with `cxrscreen export`)")
        return load_onnx_run(model, threads=threads)
    raise CXRError(f"unknown engine {engine!r}; use {' or '.join(ENGINES)}")
