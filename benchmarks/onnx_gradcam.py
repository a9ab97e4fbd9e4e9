"""Can Grad-CAM run on ONNX Runtime? A feasibility measurement (JSON on stdout).

Grad-CAM needs the gradient of a class score with respect to a feature map; ONNX has no autograd. This builds
logits + Grad-CAM (blocks' output of an EfficientNet-Lite0 classifier, 3 classes, grey input, the predicted class)
as ONE forward graph: `torch.func.vjp` inside `forward`, traced by `make_fx` into plain aten ops (the backward ops
included), exported with the dynamo ONNX exporter. Plain `torch.onnx.export` (TorchScript or dynamo) of a module
that calls vjp fails; the traced joint graph exports once `aten.convolution_backward` (which the exporter cannot
translate) is decomposed into a transposed convolution. It reports whether each route exports, the largest
difference of logits and CAM against eager PyTorch on the same weights, and seconds per batch on both.

Random weights (the measurement is about the graph, not the model); needs the `bench` extra (onnxscript).

    python benchmarks/onnx_gradcam.py > docs/results/onnx_gradcam.json
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx


class LogitsAndCam(nn.Module):
    """(logits (B, C), Grad-CAM of the arg-max class at the last block's output (B, h, w), unnormalised)."""

    def __init__(self, net: nn.Module, classes: int) -> None:
        super().__init__()
        self.net, self.classes = net, classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.net
        feats = n.blocks(n.bn1(n.conv_stem(x)))
        logits, vjp = torch.func.vjp(lambda f: n.forward_head(n.bn2(n.conv_head(f))), feats)
        chosen = (torch.arange(self.classes)[None] == logits.argmax(1, keepdim=True)).to(logits.dtype)
        (grad,) = vjp(chosen)
        cam = torch.relu((grad.mean((2, 3), keepdim=True) * feats).sum(1))
        return logits, cam


def conv_backward_as_transpose(grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, bias_sizes: Any,
                               stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                               output_padding: list[int], groups: int, mask: list[bool]) -> tuple[Any, None, None]:
    """aten.convolution_backward for the input gradient only, as a transposed convolution (what ONNX has)."""
    if transposed or mask[1] or mask[2]:
        raise NotImplementedError("only the input gradient of a plain convolution")
    k = weight.shape[-2:]
    extra = [inp.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
             for i in range(2)]
    grad_in = torch.nn.functional.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation)
    return grad_in, None, None


def _plain(message: str) -> str:
    """First line of an error message without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", message.splitlines()[0])[:200]


def _seconds(fn: Any, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    torch.set_num_threads(2)
    size, batch, repeats = 224, 4, 5
    net = timm.create_model("tf_efficientnet_lite0", num_classes=3, in_chans=1, pretrained=False).eval()
    model = LogitsAndCam(net, 3).eval()
    x = torch.rand(batch, 1, size, size)
    ref_logits, ref_cam = (t.detach().numpy() for t in model(x))
    routes: dict[str, Any] = {}
    # the exporter prints its progress on stdout: keep stdout for the JSON
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for name, dynamo in (("torchscript_export_of_vjp", False), ("dynamo_export_of_vjp", True)):
            try:
                torch.onnx.export(model, (x,), str(Path(tmp) / f"{name}.onnx"), dynamo=dynamo)
                routes[name] = {"exports": True}
            except Exception as exc:  # noqa: BLE001  (the measurement is whether it fails, and how)
                routes[name] = {"exports": False, "error": f"{type(exc).__name__}: {_plain(str(exc))}"}
        t = time.perf_counter()
        joint = make_fx(model, decomposition_table={
            torch.ops.aten.convolution_backward.default: conv_backward_as_transpose})(x)
        path = Path(tmp) / "joint.onnx"
        torch.onnx.export(joint, (x,), str(path), dynamo=True, input_names=["x"], output_names=["logits", "cam"])
        export_s = time.perf_counter() - t
        onnx_bytes = sum(f.stat().st_size for f in Path(tmp).glob("joint.onnx*"))  # with external weights
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        logits, cam = session.run(None, {"x": x.numpy()})
        routes["make_fx_joint_graph_then_dynamo_export"] = {
            "exports": True, "export_seconds": round(export_s, 1), "onnx_mb": round(onnx_bytes / 2**20, 1),
            "max_abs_diff_logits": float(np.abs(logits - ref_logits).max()),
            "max_abs_diff_cam": float(np.abs(cam - ref_cam).max()), "cam_max": float(np.abs(ref_cam).max()),
            "onnxruntime_s_per_batch": round(_seconds(lambda: session.run(None, {"x": x.numpy()}), repeats), 4),
            "torch_eager_s_per_batch": round(_seconds(lambda: model(x), repeats), 4),
            "note": "the traced graph has a fixed batch size (the example's)",
        }
    print(json.dumps({"benchmark": "onnx_gradcam", "arch": "tf_efficientnet_lite0 (random weights)",
                      "image_size": size, "batch": batch, "threads": 2, "routes": routes,
                      "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                                   "timm": timm.__version__},
                      "load_average_1min": round(os.getloadavg()[0], 2)}, indent=2))


if __name__ == "__main__":
    main()
