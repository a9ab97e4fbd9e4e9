"""Heatmaps: on the original geometry, and the hot area follows a synthetic lesion."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cxrscreen.explain.cam import Explainer, hot_centroid
from cxrscreen.explain.overlay import overlay
from cxrscreen.io.xray import XRay
from cxrscreen.models.registry import create_model
from cxrscreen.predict.predictor import Predictor
from cxrscreen.runs.run_dir import LoadedRun
from cxrscreen.transforms.preprocess import PreprocessConfig, Preprocessor, to_model_tensor
from tests.conftest import synthetic_cxr

H, W = 96, 128  # non-square on purpose: the crop must be undone


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory) -> LoadedRun:
    """resnet18 trained for a few seconds to call 'covid' when a bright blob is present anywhere."""
    torch.manual_seed(0)
    # 128 px: resnet18's layer4 is then a 4 x 4 map; at 64 px it is 2 x 2, too coarse to say where a lesion is
    # (the test failed there, both heatmaps hot in one corner)
    cfg = PreprocessConfig(image_size=128, clahe=False)
    pre = Preprocessor(cfg)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i in range(192):
        has = i % 2 == 0
        lesion = (int(rng.integers(20, H - 20)), int(rng.integers(30, W - 30))) if has else None
        img, _ = pre(synthetic_cxr(H, W, lesion=lesion, seed=i))
        xs.append(to_model_tensor(img, cfg))
        ys.append(0 if has else 1)
    x, y = torch.stack(xs), torch.tensor(ys)
    model = create_model("resnet18", num_classes=3)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(4):
        for b in range(0, len(x), 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[b:b + 32]), y[b:b + 32]).backward()
            opt.step()
    model.eval()
    config = {"arch": "resnet18", "kind": "classifier", "classes": ["covid", "normal", "pneumonia"],
              "preprocess": cfg.to_dict()}
    return LoadedRun(model=model, config=config, run_dir=tmp_path_factory.mktemp("lesion"))


def _prepare(run: LoadedRun, lesion):
    return Predictor(run).prepare(XRay(pixels=synthetic_cxr(H, W, lesion=lesion, seed=99), path="x.png", meta={}))


def test_model_learned_the_lesion(lesion_run):
    p = Predictor(lesion_run)
    with_lesion = p.predict_xray(XRay(synthetic_cxr(H, W, lesion=(48, 40), seed=7), "a.png", {}))
    without = p.predict_xray(XRay(synthetic_cxr(H, W, seed=8), "b.png", {}))
    assert with_lesion.probabilities["covid"] > without.probabilities["covid"]


def test_hot_area_moves_with_the_lesion(lesion_run):
    ex = Explainer(lesion_run)
    left = ex.heatmap(_prepare(lesion_run, (48, 42)), "covid")
    right = ex.heatmap(_prepare(lesion_run, (48, 86)), "covid")
    assert left.shape == right.shape == (H, W)
    (lx, _), (rx, _) = hot_centroid(left), hot_centroid(right)
    assert rx - lx > 20, (lx, rx)  # the lesions are 44 px apart
    assert abs(lx - 42) < 20 and abs(rx - 86) < 20


def test_overlay_png_has_the_input_size(lesion_run, tmp_path):
    prep = _prepare(lesion_run, (48, 60))
    res = Predictor(lesion_run).predict_prepared([prep])[0].to_dict()  # the drawer's dict view
    ex = Explainer(lesion_run)
    out = ex.write_overlay(prep, res, tmp_path)
    img = cv2.imread(str(out))
    # the caption sits in a band above the X-ray, which keeps its size and is not written over
    assert img.shape[1] == W and img.shape[0] > H
    expected = overlay(prep.xray.pixels, ex.heatmap(prep, res["class"]))
    assert np.abs(img[-H:].astype(int) - expected.astype(int)).max() <= 1
    assert out.name == "x_heatmap.png"
    assert 0 <= res["heatmap_in_lungs"] <= 1


def test_cam_layer_comes_from_the_run_config(lesion_run):
    from cxrscreen.errors import CXRError

    assert Explainer(lesion_run).layer is lesion_run.model.layer4
    run = LoadedRun(model=lesion_run.model, config={**lesion_run.config, "cam_layer": "layer3"},
                    run_dir=lesion_run.run_dir)
    assert Explainer(run).layer is lesion_run.model.layer3
    assert Explainer(lesion_run, layer="layer2").layer is lesion_run.model.layer2
    with pytest.raises(CXRError, match="not a layer"):
        Explainer(lesion_run, layer="layer9")


def test_unknown_target_is_a_clear_error(lesion_run):
    from cxrscreen.errors import CXRError

    with pytest.raises(CXRError, match="unknown target"):
        Explainer(lesion_run).cam(np.zeros((64, 64), np.uint8), "tuberculosis")


def test_task_drawer_returns_the_picture_and_writes_nothing(lesion_run, tmp_path, monkeypatch):
    """The one drawing path of CLI, server and PACS output: the task's drawer gives an array (caption band
    above when asked, the severity zones' band below), and writing it is the caller's step."""
    from cxrscreen.explain.overlay import band_height

    monkeypatch.chdir(tmp_path)
    prep = _prepare(lesion_run, (48, 60))
    res = Predictor(lesion_run).predict_prepared([prep])[0].to_dict()
    draw = lesion_run.task.drawer(lesion_run)
    plain = draw(prep, dict(res), None, caption=False)
    heat = overlay(prep.xray.pixels, Explainer(lesion_run).heatmap(prep, res["class"]))
    assert plain.dtype == np.uint8 and plain.shape == (H, W, 3)
    assert np.abs(plain.astype(int) - heat.astype(int)).max() <= 1
    captioned = draw(prep, dict(res), None)
    assert captioned.shape[0] > H and np.abs(captioned[-H:].astype(int) - heat.astype(int)).max() <= 1
    sev = {"zones": [{"brixia": z, "extent_estimate": 0.5} for z in "ABCDEF"], "geographic_extent": 3.0,
           "opacity": 2.0, "per_lung": {"right": 1.5, "left": 1.5}}
    zoned = draw(prep, {**res, "severity": sev}, None, caption=False)
    from cxrscreen.severity.zones import zone_lines

    assert zoned.shape == (H + band_height(plain, zone_lines(sev)), W, 3)
    assert np.array_equal(zoned[:H], plain)
    assert list(tmp_path.iterdir()) == []
