"""Shared by the batch-screening and ONNX tests: a tiny random-init run directory and synthetic image folders."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cxrscreen.models.registry import create_model
from cxrscreen.runs.run_dir import save_weights, write_config
from cxrscreen.transforms.preprocess import PreprocessConfig
from tests.conftest import synthetic_cxr

CLASSES = ["covid", "normal", "pneumonia"]


def make_tiny_run(d: Path, arch: str = "tf_efficientnet_lite0", size: int = 64, seed: int = 0) -> Path:
    """A random-init run directory of `arch` at `size` px, with a gate that accepts every image (so that
    synthetic images get probabilities) but keeps its hard rules."""
    import torch

    from cxrscreen.gate.model import GATE_FILE, Gate, bundled_gate_path

    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=3)
    sha = save_weights(model, d)
    write_config(d, {"arch": arch, "kind": "classifier", "classes": CLASSES,
                     "preprocess": PreprocessConfig(image_size=size).to_dict(), "weights_sha256": sha,
                     "calibration": {"temperature": 1.5}})
    gate = Gate.from_json(bundled_gate_path())
    gate.p_threshold, gate.novelty_threshold = 1.0, 1e12
    gate.to_json(d / GATE_FILE)
    return d


def write_images(folder: Path, n: int, *, size: tuple[int, int] = (160, 140), bad: int = 1) -> list[Path]:
    """n synthetic X-ray PNGs in folder/a and folder/b, plus `bad` files that are not images."""
    paths = []
    for i in range(n):
        p = folder / ("a" if i % 2 else "b") / f"img_{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        lesion = (40 + i % 50, 30 + (7 * i) % 60) if i % 3 else None
        assert cv2.imwrite(str(p), (synthetic_cxr(*size, lesion=lesion, seed=i) * 255).astype(np.uint8))
        paths.append(p)
    for j in range(bad):
        p = folder / "a" / f"broken_{j}.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
        paths.append(p)
    return paths
