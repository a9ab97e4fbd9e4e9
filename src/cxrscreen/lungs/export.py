"""The lung segmenter as an ONNX file (`cxrscreen export --lungs`), and loading it back without torch.

The graph takes ``image`` float32 (N, 1, S, S), the normalised grey square of the segmenter's preprocessing,
N dynamic, and returns ``logits`` (N, 3, S, S). ``metadata_props``: ``cxrscreen.lungs`` (the model folder's
lungs.json, whose preprocessing and sha256 the export came from). `load_lungs_onnx(path)` returns a
LungSegmenter whose model is an ONNX Runtime session (`predict.onnx_engine.OnnxModel`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.lungs.segmenter import LungSegmenter
from cxrscreen.predict.onnx_engine import DEFAULT_OPSET, INPUT_NAME, LOGITS_NAME, OnnxModel, _require, _session

META_KEY = "cxrscreen.lungs"


def export_lungs_onnx(seg: LungSegmenter, out_path: str | Path, *, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write `seg`'s network to `out_path`, check it with onnx.checker and against PyTorch on two random inputs.
    Returns {path, opset, bytes, max_abs_diff_logits}. CXRError when the export fails."""
    import torch

    onnx = _require("onnx")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    size = seg.preprocess.image_size
    example = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    tmp = out_path.with_name(out_path.name + f".{os.getpid()}.tmp")
    model = seg.model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[LOGITS_NAME],
                              opset_version=opset, dynamo=False,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, LOGITS_NAME: {0: "batch"}})
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(seg.config)
        proto.producer_name = "cxrscreen"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    except Exception as exc:  # exporter and checker errors come in many types
        tmp.unlink(missing_ok=True)
        raise CXRError(f"ONNX export of the lung segmenter failed ({type(exc).__name__}: {exc})", out_path) from exc
    os.replace(tmp, out_path)
    with torch.no_grad():
        expected = model(example).numpy()
    got = OnnxModel(out_path, threads=1)(example.numpy())
    return {"path": str(out_path), "opset": opset, "bytes": out_path.stat().st_size,
            "max_abs_diff_logits": float(np.abs(expected - got).max())}


def load_lungs_onnx(path: str | Path, *, threads: int | None = None) -> LungSegmenter:
    """A LungSegmenter running an exported .onnx file in ONNX Runtime (no torch); CXRError when the file is not
    a cxrscreen lung export."""
    path = Path(path)
    if not path.is_file():
        raise CXRError("ONNX lung model file not found", path)
    meta = _session(path, 1).get_modelmeta().custom_metadata_map
    if META_KEY not in meta:
        raise CXRError("not a cxrscreen lung segmenter export (no cxrscreen.lungs metadata)", path)
    try:
        config = json.loads(meta[META_KEY])
    except ValueError as exc:
        raise CXRError(f"broken cxrscreen.lungs metadata ({exc})", path) from exc
    return LungSegmenter(OnnxModel(path, threads=threads), config, path.parent)
