"""Feature-head models: the module, the feature cache, the grouped-CV head fit, `cxrscreen fit-head` writing a run
directory that loads, predicts, explains and exports like every other model (generated images only)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.data.splits import split_grouped, write_split
from cxrscreen.errors import CXRError
from cxrscreen.models.feature_head import cam_layer_for, check_options
from cxrscreen.models.registry import create_model
from cxrscreen.training.feature_cache import FeatureCache, select_stages
from cxrscreen.training.head import HeadRecipe, fit_logistic
from cxrscreen.transforms.preprocess import PreprocessConfig, to_model_array
from tests.conftest import synthetic_cxr

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["covid", "normal", "pneumonia"]
LESION = {"covid": (60, 28), "normal": None, "pneumonia": (30, 68)}
SIZE = 96


def _invoke(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_model_options_checked_and_forward_shape() -> None:
    m = create_model("lite0_features", num_classes=3, weights=None, options={"stages": ["blocks.1", "head"]})
    assert m.dims == [24, 1280]
    assert m(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    assert m.backbone.conv_stem.in_channels == 1
    with pytest.raises(CXRError, match="unknown feature-head option"):
        check_options({"stagez": ["head"]})
    with pytest.raises(CXRError, match="unknown feature stage"):
        check_options({"stages": ["layer4"]})
    with pytest.raises(CXRError, match="no stage"):
        create_model("lite0_features", weights=None, options={"stages": ["blocks.9"]})
    with pytest.raises(CXRError, match="takes no model options"):
        create_model("resnet18", weights=None, options={"stages": ["head"]})
    assert cam_layer_for(["blocks.2", "blocks.5", "blocks.3"]) == "backbone.blocks.5"
    assert cam_layer_for(["blocks.6", "head"]) == "backbone.bn2"


def test_flip_averaging_makes_the_output_mirror_invariant() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64, 64)
    flipped = torch.flip(x, dims=(3,))
    for flip, same in ((True, True), (False, False)):
        m = create_model("lite0_features", weights=None, options={"stages": ["blocks.3"], "flip": flip}).eval()
        torch.nn.init.normal_(m.head.weight)
        with torch.no_grad():
            close = torch.allclose(m(x), m(flipped), atol=1e-5)
        assert close is same


def test_flip_features_reuse_the_unflipped_cache_and_equal_the_flipping_model(tmp_path: Path) -> None:
    pre = PreprocessConfig(image_size=64)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    plain = FeatureCache("lite0_features", pre, cache_dir=tmp_path, batch_size=2)
    plain.features(images)
    flip = FeatureCache("lite0_features", pre, flip=True, cache_dir=tmp_path, batch_size=2)
    got = flip.features(images)
    assert (flip.hits, flip.misses) == (3, 3)  # the images were cached; only their mirror images were computed
    assert flip.dir == plain.dir and flip.key != plain.key
    model = create_model("lite0_features", num_classes=1, in_chans=1, weights="imagenet",
                         options={"stages": list(flip.all_stages), "flip": True}).eval()
    with torch.no_grad():
        want = model.pooled(torch.from_numpy(to_model_array(list(images), pre))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    again = FeatureCache("lite0_features", pre, flip=True, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.features(images), got)
    assert (again.hits, again.misses) == (6, 0)


def test_grouped_cv_is_not_fooled_by_copies_within_a_group() -> None:
    """Each group: 10 near-copies of one random vector and one random label. Image-level CV would reward
    memorising (the weakest penalty); grouped CV sees no signal and picks the strongest penalty."""
    rng = np.random.default_rng(0)
    n_groups, copies, dim = 40, 10, 30
    centres = rng.normal(size=(n_groups, dim))
    labels = rng.integers(0, 3, n_groups)
    x = np.repeat(centres, copies, axis=0) + 0.01 * rng.normal(size=(n_groups * copies, dim))
    y = np.repeat(labels, copies)
    groups = [f"g{i}" for i in np.repeat(np.arange(n_groups), copies)]
    head = fit_logistic(x, y, groups, n_classes=3, cs=[0.001, 100.0], folds=5)
    assert head.c == 0.001
    assert [r["C"] for r in head.cv] == [0.001, 100.0]


def test_fit_logistic_matches_sklearn_and_handles_an_absent_class() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (30, 4)), rng.normal(2, 1, (30, 4))])
    y = np.array([0] * 30 + [2] * 30)  # class 1 absent
    head = fit_logistic(x, y, [str(i) for i in range(60)], n_classes=3, cs=[0.5])
    z = (x - x.mean(0)) / x.std(0)
    ref = LogisticRegression(C=0.5, max_iter=2000, class_weight="balanced").fit(z, y).predict_proba(z)
    logits = head.logits(x)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.allclose(p[:, [0, 2]], ref, atol=1e-4)
    assert p[:, 1].max() < 1e-6
    with pytest.raises(CXRError, match="two classes"):
        fit_logistic(x[:30], y[:30], [str(i) for i in range(30)], n_classes=3, cs=[1.0])


def test_select_stages_takes_columns_in_the_asked_order() -> None:
    feats = np.arange(12, dtype=np.float32).reshape(2, 6)
    got = select_stages(feats, ["a", "b", "c"], {"a": 1, "b": 2, "c": 3}, ["c", "a"])
    assert got.tolist() == [[3, 4, 5, 0], [9, 10, 11, 6]]
    with pytest.raises(CXRError, match="no stage"):
        select_stages(feats, ["a"], {"a": 6}, ["z"])


def test_feature_cache_key_ignores_the_lung_margin_outside_the_lungs_mode() -> None:
    """The lungs mode's margin joined PreprocessConfig after the crop/pad feature caches were written: it must not
    change their keys (every cached extraction would be recomputed), but it must separate lungs-mode caches."""
    def key(**kw: object) -> str:
        return FeatureCache("lite0_features", PreprocessConfig(**kw), cache_dir=None).key  # type: ignore[arg-type]

    assert key(resize_mode="crop", lung_margin=0.1) == key(resize_mode="crop", lung_margin=0.3)
    assert key(resize_mode="pad", lung_margin=0.1) == key(resize_mode="pad", lung_margin=0.3)
    assert key(resize_mode="lungs", lung_margin=0.1) != key(resize_mode="lungs", lung_margin=0.3)
    assert key(resize_mode="crop") != key(resize_mode="pad") != key(resize_mode="lungs")
    assert key(clahe=True) != key(clahe=False) and key(image_size=224) != key(image_size=256)
    assert key(mean=0.5, std=0.5) != key(mean=0.4, std=0.5)  # the features see the normalisation


def test_recipe_rejects_bad_keys(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("head: {arch: resnet18}\n")
    with pytest.raises(CXRError, match="not a feature-head architecture"):
        HeadRecipe.from_yaml(bad)
    bad.write_text("head: {stagez: [head]}\n")
    with pytest.raises(CXRError, match="unknown head recipe key"):
        HeadRecipe.from_yaml(bad)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """36 generated PNGs (3 classes x 2 sources x 6 patients) and a grouped split."""
    root = tmp_path_factory.mktemp("fh_data")
    (root / "images").mkdir()
    rows = []
    for ci, label in enumerate(CLASSES):
        for si, source in enumerate(("site_a", "site_b")):
            for k in range(6):
                img = synthetic_cxr(SIZE, SIZE, lesion=LESION[label], seed=100 * ci + 10 * si + k)
                name = f"images/{label}_{source}_{k}.png"
                assert cv2.imwrite(str(root / name), np.rint(img * 255).astype(np.uint8))
                rows.append({"image": name, "label": label, "source": source, "patient_id": f"{source}{ci}{k}",
                             "split_group": f"{source}{ci}{k}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    split = write_split(split_grouped(pd.DataFrame(rows), seed=0, test_frac=0.3, val_frac=0.25), root / "split.csv")
    return {"root": root, "split": Path(split)}


@pytest.fixture(scope="module")
def fitted(synthetic: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("fh_run")
    mp.setenv("CXRSCREEN_CACHE", str(tmp / "cache"))
    try:
        run = tmp / "run"
        res = _invoke("fit-head", "--data", synthetic["root"], "--split", synthetic["split"], "--out", run,
                      "--stages", "3,5", "--image-size", 64, "--flip")
        assert res.exit_code == 0, res.output
        again = tmp / "run2"
        res2 = _invoke("fit-head", "--data", synthetic["root"], "--split", synthetic["split"], "--out", again,
                       "--stages", "3,5", "--image-size", 64, "--flip", "--no-calibrate")
        assert res2.exit_code == 0, res2.output
    finally:
        mp.undo()
    return {"run": run, "run2": again, "tmp": tmp}


def test_fit_head_writes_a_calibrated_run_with_its_options(fitted: dict) -> None:
    cfg = json.loads((fitted["run"] / "config.json").read_text())
    assert cfg["arch"] == "lite0_features"
    assert cfg["model_options"] == {"stages": ["blocks.3", "blocks.5"], "flip": True}
    assert cfg["cam_layer"] == "backbone.blocks.5"
    assert cfg["preprocess"]["image_size"] == 64
    assert cfg["training"]["chosen_C"] in cfg["training"]["cs"]
    assert cfg["training"]["cv"], "the penalty was chosen by cross-validation"
    assert "temperature" in cfg["calibration"] and "decision" in cfg
    assert cfg["feature_cache"]["misses"] > 0
    cfg2 = json.loads((fitted["run2"] / "config.json").read_text())
    # a flip recipe looks up each image and its mirror image: two cached passes per image
    assert cfg2["feature_cache"]["misses"] == 0 and cfg2["feature_cache"]["hits"] == 2 * cfg["data"]["train_images"]
    assert cfg2["weights_sha256"] == cfg["weights_sha256"]


def test_the_loaded_model_computes_what_the_head_was_fitted_on(fitted: dict, synthetic: dict[str, Path]) -> None:
    from cxrscreen.runs.run_dir import load_run

    run = load_run(fitted["run"])
    pre = PreprocessConfig.from_dict(run.config["preprocess"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
    cache = FeatureCache("lite0_features", pre, flip=True, cache_dir=None)
    feats = cache.select_stages(cache.features(images), ["blocks.3", "blocks.5"])
    m = run.model
    expected = ((torch.from_numpy(feats) - m.feature_mean) / m.feature_scale) @ m.head.weight.T + m.head.bias
    got = run.task.logits(run, images)
    assert np.allclose(got, expected.detach().numpy(), atol=1e-3)


def test_predict_heatmap_and_onnx_of_a_feature_head_run(fitted: dict, synthetic: dict[str, Path],
                                                        tmp_path: Path) -> None:
    from cxrscreen.gate.model import GATE_FILE, Gate, bundled_gate_path

    gate = Gate.from_json(bundled_gate_path())  # accept the drawings (the bundled gate knows real X-rays)
    gate.p_threshold, gate.novelty_threshold = 1.0, 1e12
    gate.to_json(fitted["run"] / GATE_FILE)
    image = synthetic["root"] / "images" / "covid_site_a_0.png"
    res = _invoke("predict", image, "--model", fitted["run"], "--heatmap", tmp_path / "heat", "--json")
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout.splitlines()[0])["probabilities"]) == set(CLASSES)
    assert list((tmp_path / "heat").glob("*.png"))
    from cxrscreen.explain.cam import Explainer
    from cxrscreen.runs.run_dir import load_run

    run = load_run(fitted["run"])
    assert Explainer(run).layer is run.model.backbone.blocks[5]
    pytest.importorskip("onnxruntime")
    from cxrscreen.predict.onnx_export import export_onnx

    info = export_onnx(run, tmp_path / "m.onnx")
    assert info["max_abs_diff_probabilities"] < 1e-3


@pytest.fixture(scope="module")
def site_without_covid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'children's hospital': 24 generated films, normal and pneumonia only, brighter exposure."""
    root = tmp_path_factory.mktemp("fh_site")
    (root / "images").mkdir()
    rows = []
    for label in ("normal", "pneumonia"):
        for k in range(12):
            img = np.clip(synthetic_cxr(SIZE, SIZE, lesion=LESION[label], seed=900 + k) + 0.08, 0, 1)
            name = f"images/{label}_{k}.png"
            assert cv2.imwrite(str(root / name), np.rint(img * 255).astype(np.uint8))
            rows.append({"image": name, "label": label, "source": "kids", "patient_id": f"k{label}{k}",
                         "split_group": f"k{label}{k}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def test_adapt_keeps_the_class_the_site_lacks(fitted: dict, site_without_covid: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from cxrscreen.runs.run_dir import load_run
    from cxrscreen.training.adapt import adapt_head, read_replay

    monkeypatch.setenv("CXRSCREEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "adapted"
    res = _invoke("adapt", "--model", fitted["run"], "--data", site_without_covid, "--out", out, "--n-boot", 20)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    a = cfg["adaptation"]
    assert a["site_data"] == str(site_without_covid) and a["site_sources"] == ["kids"]
    assert a["replay_per_class"][0] > 0, "COVID rows were replayed"
    assert "kids" in (out / "ADAPTATION.md").read_text()
    run = load_run(out)
    assert run.model.head.bias[0].item() > -10, "the COVID output was kept"
    report = json.loads((out / "eval" / "adaptation.json").read_text())
    assert report["site_test_before"]["n"] == report["site_test_after"]["n"] > 0
    # without the replay, the same site data gives a head that can never say COVID
    rx, ry, _ = read_replay(fitted["run"])
    site = np.random.default_rng(0).normal(size=(10, rx.shape[1]))
    no_replay = adapt_head(site, np.array([1, 2] * 5), [str(i) for i in range(10)], rx[:0], ry[:0], n_classes=3,
                           cs=[1.0])
    assert no_replay.bias[0] == -30.0
    with_replay = adapt_head(site, np.array([1, 2] * 5), [str(i) for i in range(10)], rx, ry, n_classes=3, cs=[1.0])
    assert with_replay.bias[0] > -10


def test_adapt_refuses_a_model_that_is_not_a_feature_head(tmp_path: Path, site_without_covid: Path) -> None:
    (tmp_path / "run").mkdir()
    res = _invoke("adapt", "--model", tmp_path / "run", "--data", site_without_covid, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "error:" in res.output


def test_recipe_carries_the_lungs_margin_into_preprocessing(tmp_path: Path) -> None:
    r = tmp_path / "r.yaml"
    r.write_text("head: {resize_mode: lungs, lung_margin: 0.2}\n")
    pre = HeadRecipe.from_yaml(r).preprocess
    assert (pre.resize_mode, pre.lung_margin) == ("lungs", 0.2)
    r.write_text("head: {resize_mode: lungs, lung_margin: 1.5}\n")
    with pytest.raises(CXRError, match="lung_margin"):
        HeadRecipe.from_yaml(r)
