"""A tiny random-init EfficientNet-Lite0 run with a severity regressor fitted on synthetic images (per-lung
pooling and flip averaging, the shipped kind of feature set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxrscreen.models.registry import create_model
from cxrscreen.runs.run_dir import LoadedRun, load_run, save_weights, write_config
from cxrscreen.severity.features import FeatureExtractor, FeatureSpec
from cxrscreen.severity.model import SeverityRegressor
from cxrscreen.transforms.preprocess import PreprocessConfig
from tests.conftest import synthetic_cxr

CLASSES = ["covid", "normal", "pneumonia"]
SPEC = FeatureSpec("model", preprocess=PreprocessConfig(64, resize_mode="pad", mean=0.5, std=0.5),
                   blocks=("blocks.4", "head"), pooling="lungs", flip=True)


@pytest.fixture(scope="package")
def sev_run(tmp_path_factory: pytest.TempPathFactory) -> LoadedRun:
    """Run dir: random-init tf_efficientnet_lite0 (64 px) + severity.json / .safetensors on its features."""
    d = tmp_path_factory.mktemp("sevrun")
    model = create_model("tf_efficientnet_lite0", num_classes=3)
    sha = save_weights(model, d)
    write_config(d, {"arch": "tf_efficientnet_lite0", "kind": "classifier", "classes": CLASSES,
                     "preprocess": PreprocessConfig(image_size=64).to_dict(), "weights_sha256": sha})
    run = load_run(d)
    ext = FeatureExtractor(run.model, SPEC)
    imgs = [synthetic_cxr(96, 80, lesion=(30 + 3 * i, 20 + 2 * i), seed=i) for i in range(12)]
    prepared = [ext.prepare(p) for p in imgs]
    maps = ext.maps([im for im, _ in prepared])
    y = np.stack([np.linspace(0, 8, 12), np.linspace(0, 6, 12)], 1)
    x = ext.features(maps, [g for _, g in prepared])
    reg = SeverityRegressor.fit(x, y, [f"g{i // 2}" for i in range(12)], SPEC, [m.shape[1] for m in maps])
    reg.save(d, {"classifier_weights_sha256": sha})
    return load_run(d)


@pytest.fixture()
def xray_png(tmp_path: Path) -> Path:
    import cv2

    path = tmp_path / "chest.png"
    cv2.imwrite(str(path), (synthetic_cxr(120, 100, lesion=(50, 30)) * 255).astype(np.uint8))
    return path
