"""ONNX export of a classifier run (PyTorch and the onnx package): the file the ONNX Runtime engine reads.

See `predict.onnx_engine` for the file's contract (inputs, outputs, metadata) and the engine.
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
from cxrscreen.predict.onnx_engine import (
    DEFAULT_OPSET,
    INPUT_NAME,
    LOGITS_NAME,
    META_PREFIX,
    PROBS_NAME,
    OnnxModel,
    _require,
    export_metadata_keys,
)
from cxrscreen.runs.run_dir import LoadedRun


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
    got = OnnxModel(out_path, threads=1).run(example.numpy())[PROBS_NAME]
    return {"path": str(out_path), "opset": opset, "bytes": out_path.stat().st_size,
            "max_abs_diff_probabilities": float(np.abs(expected - got).max()),
            "metadata_keys": sorted(export_metadata_keys(out_path))}
