"""Shortcut audit on a tiny real subset (80 images, 48 px, 1 epoch per model) and the masking helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrscreen.audit import masking as audit
from cxrscreen.audit.masking import lung_mask, mask_image, masking_set, pixel_boxes
from cxrscreen.audit.run import run_audit
from cxrscreen.data.lung_boxes import LungBoxes
from cxrscreen.engine import loop as engine
from cxrscreen.errors import CXRError
from cxrscreen.runs.run_dir import load_run
from cxrscreen.training.config import TrainConfig
from cxrscreen.training.train import train
from cxrscreen.transforms.preprocess import PreprocessConfig, Preprocessor
from tests.conftest import read_real_manifest, synthetic_cxr, write_real_subset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

COCO = Path("annotations") / "lung_boxes.coco.json"


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny(data_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """80 real images (20 per source, all labels, 10 Cohen images with lung boxes), split, trained run."""
    df = read_real_manifest(data_dir)
    annotated = {im["file_name"] for im in json.loads((data_dir / COCO).read_text())["images"]}
    cohen = df[df["source"] == "cohen"]
    parts = [
        cohen[cohen["image"].isin(annotated)].sample(10, random_state=0),
        cohen[(cohen["label"] == "normal") & ~cohen["image"].isin(annotated)].sample(4, random_state=0),
        cohen[(cohen["label"] == "pneumonia") & ~cohen["image"].isin(annotated)].sample(6, random_state=0),
        df[df["source"] == "covid-cxnet"].sample(20, random_state=0),
        df[(df["source"] == "nih") & (df["label"] == "normal")].sample(10, random_state=0),
        df[(df["source"] == "nih") & (df["label"] == "pneumonia")].sample(10, random_state=0),
        df[df["source"] == "rsna"].sample(20, random_state=0),
    ]
    root, split = write_real_subset(data_dir, pd.concat(parts), tmp_path_factory.mktemp("audit"),
                                    test_frac=0.3, val_frac=0.2)
    cfg = TrainConfig(
        arch="resnet18",
        epochs=1,
        batch_size=16,
        seed=0,
        cache_dir=str(root / "cache"),
        preprocess=PreprocessConfig(image_size=48),
    )
    train(cfg, root, split, root / "run", log=_quiet)
    return {
        "root": root,
        "split": split,
        "run": root / "run",
        "cache": root / "cache",
        "coco": data_dir / COCO,
    }


@pytest.fixture(scope="module")
def audited(tiny) -> dict:
    """One audit with every part (LOSO of rsna only, 1 epoch per trained model)."""
    return run_audit(
        tiny["run"],
        tiny["root"],
        tiny["split"],
        tiny["root"] / "audit",
        loso_epochs=1,
        budget_minutes_per_model=1.0,
        cache_dir=tiny["cache"],
        n_boot=20,
        lung_boxes=tiny["coco"],
        loso_sources=["rsna"],
        log=_quiet,
    )


# ------------------------------------------------------------------------------------------ masking helpers
def test_mask_image_on_synthetic_geometry():
    pre = Preprocessor(PreprocessConfig(image_size=48, clahe=False))
    img, geom = pre(synthetic_cxr(h=300, w=200))  # centre crop: rows 50..250 of the original
    orig = [(20.0, 80.0, 90.0, 230.0), (110.0, 80.0, 180.0, 230.0), (0.0, 0.0, 199.0, 40.0)]
    boxes = pixel_boxes(geom, orig)
    assert len(boxes) == 2  # the third lies above the crop and is dropped
    x0, y0, x1, y1 = boxes[0]
    assert (x0, y0) == (int(20 * 48 / 200), int(30 * 48 / 200)) and x1 >= 90 * 48 / 200 and y1 >= 180 * 48 / 200
    inside = lung_mask(48, boxes)
    masked, only = mask_image(img, boxes, "lungs_masked"), mask_image(img, boxes, "lungs_only")
    assert (masked[inside] == 0).all() and (masked[~inside] == img[~inside]).all()
    assert (only[~inside] == 0).all() and (only[inside] == img[inside]).all()
    assert img[inside].any() and img[~inside].any()
    with pytest.raises(ValueError):
        mask_image(img, boxes, "lungs")


def test_lung_boxes_atlas_and_lookup(tiny):
    lb = LungBoxes.from_coco(tiny["coco"])
    assert len(lb.annotated) == 147 and set(lb.atlas) == {"right", "left"}
    right, left = lb.atlas["right"], lb.atlas["left"]
    assert 0 <= right[0] < right[2] <= 1 and 0 <= left[1] < left[3] <= 1 and right[0] < left[0]
    name = next(iter(lb.annotated))
    (h, w), boxes = lb.annotated[name]
    got, kind = lb.boxes_for(Path("/anywhere/data") / name, (h, w))
    assert kind == "annotated" and got == boxes
    got, kind = lb.boxes_for("/x/images/rsna/nope.jpg", (100, 200))
    assert kind == "atlas" and got[0] == pytest.approx((right[0] * 200, right[1] * 100, right[2] * 200, right[3] * 100))


def test_masked_test_images_are_black_inside_the_mapped_boxes(tiny):
    run = load_run(tiny["run"])
    ms = masking_set(run, tiny["root"], tiny["split"], LungBoxes.from_coco(tiny["coco"]), cache_dir=tiny["cache"])
    assert "annotated" in ms.kinds and "atlas" in ms.kinds and ms.lung_source == "segmenter"
    seg_masked = ms.images("lungs_masked")
    for i, region in enumerate(ms.segmented):
        # the default lungs are the segmented ones: pixels outside them are kept, inside them blacked out
        assert region.any() and (region == ms.region(i)).all()
        assert (seg_masked[i][region] == 0).all() and (seg_masked[i][~region] == ms.data.images[i][~region]).all()
    masked, only = ms.images("lungs_masked", "boxes"), ms.images("lungs_only", "boxes")
    for i, boxes in enumerate(ms.boxes):
        assert boxes, ms.data.paths[i]
        m = lung_mask(48, boxes)
        assert (masked[i][m] == 0).all() and (masked[i][~m] == ms.data.images[i][~m]).all()
        assert (only[i][~m] == 0).all() and (only[i][m] == ms.data.images[i][m]).all()
    assert (ms.images("original") == ms.data.images).all()


# ------------------------------------------------------------------------------------------------ run_audit
def test_audit_json_meta(audited, tiny):
    saved = json.loads((tiny["root"] / "audit" / "audit.json").read_text())
    assert set(saved) >= {"meta", "findings", "per_source", "masking", "probe", "loso"}
    meta = saved["meta"]
    assert meta["weights_sha256"] == json.loads((tiny["run"] / "config.json").read_text())["weights_sha256"]
    assert len(meta["manifest_sha256"]) == 64 and len(meta["split_sha256"]) == 64
    assert meta["seed"] == 0 and meta["loso_epochs"] == 1 and meta["versions"]["torch"]
    assert meta["recipe"]["epochs"] == 1 and meta["recipe"]["budget_minutes"] == 1.0


def test_per_source(audited):
    ps = audited["per_source"]
    assert set(ps["sources"]) <= {"cohen", "covid-cxnet", "nih", "rsna"} and len(ps["sources"]) >= 3
    assert ps["overall"]["n"] == sum(s["n"] for s in ps["sources"].values())
    for s in ps["sources"].values():
        assert 0 <= s["accuracy"] <= 1 and 0 < s["chance"] <= 1
    assert ps["sources"]["rsna"]["recall"].keys() == {"normal"} and ps["sources"]["rsna"]["chance"] == 1.0


def test_masking_part(audited):
    mk = audited["masking"]
    assert mk["lung_source"] == "segmenter" == audited["meta"]["lung_source"]
    assert mk["subsets"] == mk["segmented"]["subsets"] and mk["boxes"]["lung_source"] == "boxes"
    cmp = mk["comparison"]["lungs_masked"]["covid_auc"]
    assert cmp["segmented"] == mk["segmented"]["subsets"]["all"]["lungs_masked"]["covid_auc"]["value"]
    assert cmp["boxes"] == mk["boxes"]["subsets"]["all"]["lungs_masked"]["covid_auc"]["value"]
    assert mk["comparison"]["finding"] in mk["finding"]
    assert mk["n_annotated"] > 0 and mk["n_atlas"] > 0 and "atlas" in mk["box_note"]
    allb = mk["subsets"]["all"]
    assert allb["n"] == mk["n_annotated"] + mk["n_atlas"] == audited["per_source"]["overall"]["n"]
    for c in ("original", "lungs_masked", "lungs_only"):
        assert set(allb[c]) >= {"accuracy", "macro_f1", "covid_auc", "recall"}
        assert 0 <= allb[c]["accuracy"] <= 1
    assert allb["original"]["accuracy"] == pytest.approx(audited["per_source"]["overall"]["accuracy"])
    assert mk["subsets"]["annotated"]["n"] == mk["n_annotated"]
    # each verdict is the rule applied to that subset's own figures
    for name, sub in mk["subsets"].items():
        assert sub["shortcut_flag"] == audit.shortcut_verdict(
            sub["original"]["accuracy"], sub["lungs_masked"]["accuracy"], sub["chance"], sub["n"])[0], name
        assert sub["covid_signal_outside_lungs"] == audit.covid_signal_verdict(
            sub["lungs_masked"]["covid_auc"], sub["n"])[0], name
    # this fixture: 4 test images have annotated boxes (too few to judge), the 23 of "all" are enough
    ann = mk["subsets"]["annotated"]
    assert ann["n"] == 4 < audit.MIN_JUDGE_N and ann["shortcut_flag"] is None
    assert ann["covid_signal_outside_lungs"] is None and ann["finding"] == "only 4 images: too few to judge"
    assert allb["n"] == 23 >= audit.MIN_JUDGE_N and isinstance(mk["covid_signal_outside_lungs"], bool)
    # the overall verdicts: True if any box kind flags, else False if any clears, else None; COVID from "all"
    flags = [mk["subsets"][s]["shortcut_flag"] for s in audit.BOX_SUBSETS]
    assert mk["shortcut_flag"] is (True if True in flags else False if False in flags else None)
    assert mk["covid_signal_outside_lungs"] is allb["covid_signal_outside_lungs"]
    assert mk["finding"].startswith({True: "Shortcut:", False: "No shortcut flagged",
                                     None: "Masking test inconclusive"}[mk["shortcut_flag"]])
    assert sum(allb["lungs_masked"]["predicted"].values()) == allb["n"]


def test_shortcut_verdict():
    assert audit.shortcut_verdict(0.9, 0.85, 0.4, 100)[0] is True
    assert audit.shortcut_verdict(0.9, 0.65, 0.4, 100)[0] is True  # above 0.6 and chance + 0.1
    assert audit.shortcut_verdict(0.9, 0.45, 0.4, 100)[0] is False
    assert audit.shortcut_verdict(0.95, 0.85, 0.8, 100)[0] is False  # near a high chance rate
    assert audit.shortcut_verdict(0.9, 0.85, 0.4, 5)[0] is None
    assert audit.shortcut_verdict(0.45, 0.45, 0.4, 100)[0] is None  # the model itself is at chance


def test_covid_signal_and_collapse():
    assert audit.covid_signal_verdict({"value": 0.8, "ci95": [0.7, 0.9]}, 100)[0] is True
    assert audit.covid_signal_verdict({"value": 0.8, "ci95": [0.5, 0.9]}, 100)[0] is False
    assert audit.covid_signal_verdict({"value": 0.55, "ci95": None}, 100)[0] is False
    assert audit.covid_signal_verdict({"value": None, "ci95": None}, 100)[0] is None
    assert "normal for 95%" in audit._collapse_note({"predicted": {"covid": 5, "normal": 95, "pneumonia": 0}})
    assert audit._collapse_note({"predicted": {"covid": 30, "normal": 60, "pneumonia": 10}}) is None


def test_probe_part(audited, tiny):
    pr = audited["probe"]
    assert 0 <= pr["accuracy"] <= 1 and 0 <= pr["macro_f1"] <= 1 and 0 <= pr["label_only_accuracy"] <= 1
    split = pd.read_csv(tiny["root"] / "audit" / "probe" / "split.csv")
    man = pd.read_csv(tiny["root"] / "manifest.csv", dtype=str, keep_default_na=False)
    test = man[man["image"].isin(split.loc[split["subset"] == "test", "image"])]
    assert pr["n_test"] == len(test)
    assert pr["chance"] == pytest.approx(test["source"].value_counts().max() / len(test))
    assert pr["sources"] == ["cohen", "covid-cxnet", "nih", "rsna"]
    assert np.array(pr["confusion_matrix"]).sum() == len(test)


def test_loso_part(audited, tiny):
    lo = audited["loso"]
    assert list(lo["sources"]) == ["rsna"] and set(lo["skipped"]) == {"cohen", "covid-cxnet", "nih"}
    e = lo["sources"]["rsna"]
    assert e["held_out"]["n"] == 20 and e["classes"] == ["normal"] and e["single_class_source"]
    assert 0 <= e["held_out"]["accuracy"] <= 1 and set(e["held_out"]["recall"]) == {"normal"}
    assert e["gap"] == pytest.approx(e["internal"]["accuracy"] - e["held_out"]["accuracy"])
    assert e["train_class_counts"]["normal"] > 0 and (tiny["root"] / "audit" / "loso" / "rsna" / "run").is_dir()
    assert "external validity" in lo["note"]


def test_report_and_plots(audited, tiny):
    out = tiny["root"] / "audit"
    for name in ("audit.md", "masking.png", "masking_examples.png", "probe.png", "loso.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "masking.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "audit.md").read_text()
    for heading in (
        "## Findings",
        "## Per source",
        "## Lungs masked",
        "## Source probe",
        "## Leave one source out",
    ):
        assert heading in md
    assert "atlas" in md and audited["meta"]["weights_sha256"] in md


def test_parts_are_optional_and_loso_resumes(audited, tiny, monkeypatch, tmp_path):
    res = run_audit(
        tiny["run"],
        tiny["root"],
        tiny["split"],
        tmp_path / "a",
        parts=("per_source",),
        cache_dir=tiny["cache"],
        n_boot=5,
        log=_quiet,
    )
    assert "per_source" in res and not {"masking", "probe", "loso"} & set(res)
    # the LOSO run of the first audit is finished: a second audit over a copy reuses it and trains nothing
    shutil.copytree(tiny["root"] / "audit" / "loso", tmp_path / "c" / "loso")
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: pytest.fail("retrained"))
    res = run_audit(
        tiny["run"],
        tiny["root"],
        tiny["split"],
        tmp_path / "c",
        parts=("loso",),
        loso_epochs=1,
        budget_minutes_per_model=1.0,
        cache_dir=tiny["cache"],
        n_boot=5,
        loso_sources=["rsna"],
        log=_quiet,
    )
    assert (
        res["loso"]["sources"]["rsna"]["held_out"]["accuracy"]
        == audited["loso"]["sources"]["rsna"]["held_out"]["accuracy"]
    )
    with pytest.raises(CXRError, match="unknown audit part"):
        run_audit(tiny["run"], tiny["root"], tiny["split"], tmp_path / "b", parts=("lungs",), log=_quiet)


def test_a_feature_head_run_is_audited_without_training_parts(tiny, tmp_path):
    # the bundled v3 model is a feature-head run: its config holds a head recipe, which the audit once tried to
    # read as a fine-tuning recipe ("unknown training options") before any part ran
    from cxrscreen.predict.predictor import default_model_dir

    res = run_audit(default_model_dir(), tiny["root"], tiny["split"], tmp_path / "a", parts=("per_source",),
                    log=_quiet)
    assert res["meta"]["recipe"] is None and res["per_source"]
    assert "no model trained" in (tmp_path / "a" / "audit.md").read_text()
    with pytest.raises(CXRError, match="feature-head run"):
        run_audit(default_model_dir(), tiny["root"], tiny["split"], tmp_path / "b", parts=("per_source", "loso"),
                  log=_quiet)
