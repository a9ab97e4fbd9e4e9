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


# ------------------------------------------------------------------------------------------- batched Grad-CAM


def _full_backward_cam(run: LoadedRun, layer: torch.nn.Module, image_u8: np.ndarray, target: str) -> np.ndarray:
    """Grad-CAM as pytorch-grad-cam computes it on its own: the whole graph recorded, backward through it all."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = to_model_tensor(image_u8, run.preprocess).unsqueeze(0)
    with GradCAM(model=run.model, target_layers=[layer]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(run.classes.index(target))])
    run.model.eval()
    return np.nan_to_num(heat[0].astype(np.float32))


@pytest.fixture(scope="module")
def feature_head_run(tmp_path_factory) -> LoadedRun:
    """An untrained feature-head net (pooled blocks 2-6 into a random linear head): the stages before the CAM
    layer reach the logits without passing through it."""
    torch.manual_seed(1)
    model = create_model("lite0_features", num_classes=3, weights=None).eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    config = {"arch": "lite0_features", "kind": "classifier", "classes": ["covid", "normal", "pneumonia"],
              "preprocess": PreprocessConfig(image_size=96).to_dict(), "cam_layer": "backbone.blocks.6"}
    return LoadedRun(model=model, config=config, run_dir=tmp_path_factory.mktemp("fh"))


@pytest.mark.parametrize("which", ["lesion_run", "feature_head_run"])
def test_batched_cams_equal_one_at_a_time_and_the_full_backward(which, request):
    """Three synthetic images, each with its own target, in one Grad-CAM pass: each map equals the map of that
    image alone, and the map pytorch-grad-cam gives with the whole graph recorded (the backward now stops at the
    CAM layer)."""
    run = request.getfixturevalue(which)
    ex = Explainer(run, lungs=False)
    pre = Preprocessor(run.preprocess)
    images = [pre(synthetic_cxr(H, W, lesion=lesion, seed=s))[0]
              for s, lesion in ((1, (40, 40)), (2, None), (3, (60, 90)))]
    targets = ["covid", "normal", "pneumonia"]
    batched = ex.cams(images, targets)
    assert len(batched) == 3
    peaks = []
    for img, target, got in zip(images, targets, batched, strict=True):
        alone = ex.cam(img, target)
        full = _full_backward_cam(run, ex.layer, img, target)
        assert got.shape == alone.shape == (run.preprocess.image_size,) * 2
        assert np.abs(got - alone).max() <= 1e-5
        assert np.abs(alone - full).max() <= 1e-5
        peaks.append(float(alone.max()))
    assert max(peaks) > 0.5  # real maps, not all zeros (a class with no evidence in an image can give one)
    split = ex.cams(images, targets, batch_size=2)  # two passes
    assert max(float(np.abs(a - b).max()) for a, b in zip(split, batched, strict=True)) <= 1e-5


def test_grad_cam_records_no_graph_before_its_layer(feature_head_run):
    """The backward pass stops at the CAM layer: no weight gradient of the backbone is computed (it cost 0.55 of
    the bundled model's 0.8 s per heatmap), and the thread's grad mode is what it was."""
    run = feature_head_run
    for p in run.model.parameters():
        p.grad = None
    img = Preprocessor(run.preprocess)(synthetic_cxr(H, W, seed=5))[0]
    assert torch.is_grad_enabled()
    Explainer(run, lungs=False).cam(img, "covid")
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in run.model.backbone.parameters())
    with torch.no_grad():
        Explainer(run, lungs=False).cam(img, "covid")
        assert not torch.is_grad_enabled()


def test_drawer_draws_the_same_picture_from_a_batched_explanation(lesion_run):
    prep = _prepare(lesion_run, (48, 60))
    res = Predictor(lesion_run).predict_prepared([prep])[0].to_dict(identity=False)  # the drawer's dict view
    draw = lesion_run.task.drawer(lesion_run)
    [cam] = draw.explain([prep], ["covid"])
    assert np.array_equal(draw(prep, dict(res), "covid", caption=False, explanation=cam),
                          draw(prep, dict(res), "covid", caption=False))
