"""The study's comparison (configs/study_paper.yaml): run names per arm, paired effects of every figure, and the
report of a partly finished comparison (hand-made runs; nothing is trained)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrscreen.experiments.config import STUDY_REFERENCE, CompareConfig, train_config_for
from cxrscreen.experiments.effects import PAIRED_FIGURES, _paired_effect
from cxrscreen.experiments.probs import write_test_probs
from cxrscreen.experiments.report import (
    arm_label,
    clahe_display,
    clahe_summary,
    claims,
    convergence,
    convergence_display,
    learned,
    report_finished,
    table_rows,
)

REPO = Path(__file__).resolve().parents[2]
STUDY = REPO / "configs" / "study_paper.yaml"
CLASSES = ["covid", "normal", "pneumonia"]


def test_study_config_arms() -> None:
    cc = CompareConfig.from_yaml(STUDY)
    names = cc.run_names()
    expected = ["resnet18", "tf_efficientnet_lite0_128_imagenet", "tf_efficientnet_lite0", "densenet169", "vgg16",
                "inception_v3", "resnet152"]
    sized = [a if a.endswith("imagenet") else f"{a}_128" for a in expected]
    # every arm with CLAHE on and off, then the second seed of the best two, each in its own CLAHE setting
    assert names == [f"{a}_clahe-{s}" for a in sized for s in ("on", "off")] + [
        "tf_efficientnet_lite0_128_imagenet_seed1_clahe-on", "resnet18_128_seed1_clahe-off"]
    lite_in, lite_sc = (train_config_for(cc, e, True) for e in cc.models[1:3])
    assert lite_in.weights == "imagenet" and lite_sc.weights == "none"
    assert lite_in.preprocess == lite_sc.preprocess  # the two Lite0 arms differ only in their starting weights
    # the second seeds differ from their first-seed arms in the seed only
    for second, first in ((cc.models[7], cc.models[1]), (cc.models[8], cc.models[0])):
        (clahe,) = cc.clahe_of(second)
        a, b = train_config_for(cc, second, clahe).to_dict(), train_config_for(cc, first, clahe).to_dict()
        assert {k for k in a if a[k] != b[k]} == {"seed"} and a["seed"] == 1
    for e in cc.models:
        cfg = train_config_for(cc, e, False)
        assert cfg.monitor == "val_loss" and cfg.patience == 8 and cfg.max_train_images_per_epoch is None
        assert cfg.preprocess.image_size == 128 and cfg.preprocess.clahe is False
    # a second seed is its own arm
    e = CompareConfig.from_dict({"models": [{"arch": "resnet18", "image_size": 64, "seed": 1}]}).models[0]
    assert cc.run_name(e, True) == "resnet18_64_seed1_clahe-on"
    gpu = cc.with_gpu_recipe()
    assert gpu.run_name(gpu.models[4], True) == "vgg16_224_clahe-on"
    assert train_config_for(gpu, gpu.models[1], True).weights == "imagenet"
    assert train_config_for(gpu, gpu.models[2], True).weights == "none"


def _probs(labels: list[str], pred: list[str], p_covid: list[float]) -> pd.DataFrame:
    rows = []
    for i, (y, k, pc) in enumerate(zip(labels, pred, p_covid, strict=True)):
        p = {c: (1 - pc) / 2 for c in CLASSES}
        p["covid"] = pc
        if k != "covid":
            p[k] = 1.0  # un-normalised is fine: arg-max and the COVID score are what count
        rows.append({"image": f"i{i}.png", "label": y, "split_group": f"g{i}", **{f"p_{c}": p[c] for c in CLASSES}})
    return pd.DataFrame(rows)


def test_the_vgg_plateau_check_is_the_study_arm_without_early_stopping() -> None:
    side = CompareConfig.from_yaml(REPO / "configs" / "study_vgg_plateau.yaml")
    study = CompareConfig.from_yaml(STUDY)
    assert side.run_names() == ["vgg16_128_clahe-on"]
    a = train_config_for(side, side.models[0], True).to_dict()
    b = train_config_for(study, study.models[4], True).to_dict()
    assert {k for k in a if a[k] != b[k]} == {"epochs", "patience"}
    assert a["patience"] >= a["epochs"] == 30  # no early stop within its 30 epochs


def test_paired_effect_of_every_figure() -> None:
    labels = ["covid"] * 4 + ["normal"] * 4 + ["pneumonia"] * 4
    good = _probs(labels, labels, [0.9] * 4 + [0.1] * 8)
    bad = _probs(labels, ["normal"] * 12, [0.1] * 2 + [0.9] * 2 + [0.1] * 8)  # never calls COVID
    eff = _paired_effect(good, bad, CLASSES, n_boot=50, seed=0)
    assert eff["paired_images"] == 12
    assert eff["accuracy_paired_diff"] == pytest.approx(1 - 4 / 12)
    assert eff["covid_sensitivity_paired_diff"] == pytest.approx(1.0)
    assert eff["covid_specificity_paired_diff"] == pytest.approx(0.0)
    assert eff["covid_auc_paired_diff"] == pytest.approx(1.0 - 0.75)  # bad: 2 of 4 COVID above every other, 2 tied
    for f in PAIRED_FIGURES:
        lo, hi = eff[f"{f}_ci95"]
        assert lo <= eff[f"{f}_paired_diff"] <= hi


def _fake_run(out: Path, name: str, arch: str, clahe: bool, weights: str, probs: pd.DataFrame,
              val_loss: list[float], *, seed: int = 0, auc: float = 0.5) -> dict:
    run_dir = out / "runs" / name
    (run_dir / "eval").mkdir(parents=True)
    n = len(val_loss)
    pd.DataFrame({"epoch": range(1, n + 1), "train_loss": np.linspace(1.2, 0.5, n), "val_loss": val_loss}
                 ).to_csv(run_dir / "history.csv", index=False)
    y = np.array([CLASSES.index(v) for v in probs["label"]])
    p = probs[[f"p_{c}" for c in CLASSES]].to_numpy(float)
    write_test_probs(run_dir / "eval" / "test_probs.csv", list(probs["image"]), y, list(probs["split_group"]),
                     ["s"] * len(y), p, CLASSES)
    pred = p.argmax(1)
    cm = [[int(np.sum((y == i) & (pred == j))) for j in range(3)] for i in range(3)]
    fig = {"value": 0.5, "ci95": [0.4, 0.6]}
    return {"name": name, "arch": arch, "image_size": 128, "clahe": clahe, "weights": weights, "seed": seed,
            "kind": "classifier", "status": "ok", "stage": None, "error": None, "run_dir": f"runs/{name}",
            "best_epoch": int(np.argmin(val_loss)) + 1, "stop_reason": "early stopping", "epochs_run": n,
            "metrics": {"n_test": len(y), "accuracy": float(np.mean(pred == y)), "macro_f1": 0.5,
                        "covid_sensitivity": fig, "covid_specificity": fig, "covid_auc": {**fig, "value": auc},
                        "confusion_matrix": cm, "class_names": CLASSES},
            "files": {"probs": f"runs/{name}/eval/test_probs.csv", "history": f"runs/{name}/history.csv"}}


def test_report_of_a_partial_comparison_answers_only_from_finished_arms(tmp_path: Path) -> None:
    labels = ["covid"] * 4 + ["normal"] * 4 + ["pneumonia"] * 4
    good = _probs(labels, labels, [0.9] * 4 + [0.1] * 8)
    bad = _probs(labels, ["normal"] * 12, [0.1] * 2 + [0.9] * 2 + [0.1] * 8)
    runs = [
        _fake_run(tmp_path, "resnet18_128_clahe-on", "resnet18", True, "none", good, [1.0, 0.8, 0.7, 0.72, 0.71],
                  auc=0.7),
        _fake_run(tmp_path, "resnet18_128_clahe-off", "resnet18", False, "none", bad, [1.0, 0.9, 1.1, 0.8, 1.2],
                  auc=0.6),
        _fake_run(tmp_path, "tf_efficientnet_lite0_128_imagenet_clahe-on", "tf_efficientnet_lite0", True,
                  "imagenet", good, [0.9, 0.6, 0.5, 0.5, 0.52], auc=0.9),
        # the second seed of resnet18 CLAHE off: this time it finds every COVID image
        _fake_run(tmp_path, "resnet18_128_seed1_clahe-off", "resnet18", False, "none", good, [1.0, 0.7, 0.6],
                  seed=1, auc=0.95),
    ]
    meta = {"title": "t", "config_path": str(STUDY), "config_text": STUDY.read_text(), "seed": 0, "n_boot": 50,
            "budget_minutes_per_run": 240, "inference": {"batch_size": 32},
            "data": {"split": "s.csv", "manifest": "m", "manifest_sha256": "0" * 64, "split_sha256": "1" * 64,
                     "subset_images": {"train": 513, "val": 51, "test": 12}},
            "command": "cxrscreen compare (test)", "versions": {"torch": "x"}, "machine": {}}
    (tmp_path / "compare.json").write_text(json.dumps({"meta": meta, "runs": runs, "reference": STUDY_REFERENCE,
                                                       "complete": False}))
    cc = CompareConfig.from_yaml(STUDY)
    cc.n_boot = 50
    result = report_finished(tmp_path, cc)
    assert not result["complete"]
    assert result["pending"][0] == "tf_efficientnet_lite0_128_imagenet_clahe-off"
    assert len(result["pending"]) == 16 - 4
    (e,) = result["clahe_effect"]  # the seed-1 arm has no CLAHE-on partner
    assert e["arch"] == "resnet18" and e["covid_sensitivity_paired_diff"] == pytest.approx(1.0)
    (s,) = result["seed_effect"]
    assert (s["a"], s["b"], s["seed_a"], s["seed_b"]) == ("resnet18_128_seed1_clahe-off", "resnet18_128_clahe-off",
                                                          1, 0)
    assert s["covid_sensitivity_paired_diff"] == pytest.approx(1.0) and s["covid_auc_diff"] == pytest.approx(0.35)
    assert result["transfer_effect"] == []  # no from-scratch Lite0 arm has finished
    md = (tmp_path / "report.md").read_text()
    assert "**Is VGG-16 the best?** Not measured yet" in md
    assert "**How far does ImageNet transfer move each figure?** Not measured yet" in md
    # resnet18 without CLAHE calls every image normal: its CLAHE pair is named, not counted
    assert "**Does CLAHE help?** No architecture has both CLAHE settings evaluated and learned" in md
    assert "Left out of these counts: resnet18, whose resnet18_128_clahe-off did not learn" in md
    # the second seed is reported, and the report says the best two seed-0 arms are not both the seeded ones
    assert "**How much does a second training run move the figures?** Second seed - first" in md
    assert ("today's best two first-seed arms are tf_efficientnet_lite0_128_imagenet_clahe-on (0.900), "
            "resnet18_128_clahe-on (0.700); tf_efficientnet_lite0_128_imagenet_clahe-on and resnet18_128_clahe-on "
            "have no second seed") in md
    assert "## Not run yet" in md and "- vgg16_128_clahe-on" in md
    # the command line the README gives (`python -m cxrscreen.experiments.report compare ...`) does the same
    done = subprocess.run([sys.executable, "-m", "cxrscreen.experiments.report", "compare", str(tmp_path),
                           "--config", str(STUDY)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4 run(s) finished, 12 not run yet" in done.stdout
    # unfinished arms are in no results table row
    table = md.split("## The study's claims")[0]
    assert "vgg16_128" not in table and "resnet18_128_clahe-on" in table
    assert (tmp_path / "curves" / "resnet18_128_clahe-on.png").is_file() and (tmp_path / "roc_covid.png").is_file()


def test_arm_label_tells_imagenet_and_seeds_apart() -> None:
    assert arm_label({"arch": "tf_efficientnet_lite0", "weights": "imagenet", "seed": 0}) == \
        "tf_efficientnet_lite0 (ImageNet)"
    assert arm_label({"arch": "resnet18", "weights": "none", "seed": 1}) == "resnet18 (seed 1)"
    assert arm_label({"arch": "resnet18", "weights": "none", "seed": 0}) == "resnet18"


def test_an_arm_that_gives_one_class_to_every_image_is_not_called_stable() -> None:
    flat = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.10, 1.10, 1.10], "val_loss": [1.0986, 1.0985, 1.0986]})
    noisy = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.2, 0.9, 0.7], "val_loss": [1.0, 0.6, 0.8]})
    one_class = {"confusion_matrix": [[10, 0, 0], [40, 0, 0], [30, 0, 0]]}  # COVID for every image
    mixed = {"confusion_matrix": [[8, 1, 1], [5, 30, 5], [2, 8, 20]]}
    runs = [{"name": "vgg16_128_clahe-on", "arch": "vgg16", "metrics": one_class},
            {"name": "resnet18_128_clahe-on", "arch": "resnet18", "metrics": mixed}]
    conv = convergence(runs, {"vgg16_128_clahe-on": flat, "resnet18_128_clahe-on": noisy})
    assert [learned(c) for c in conv] == [False, True] and conv[0]["top_class_share"] == 1.0
    # jitter from the second epoch on, over the lowest val loss: |0.8 - 0.6| / 0.6 (the first epoch's drop is not in it)
    assert conv[1]["val_loss_jitter"] == pytest.approx(0.2 / 0.6)
    answers = claims({"runs": [], "pending": [], "meta": {"seed": 0}}, conv)
    stable = next(a for a in answers if a.startswith("**Is VGG-16's validation loss the most stable?**"))
    assert "Not answerable: vgg16_128_clahe-on did not learn" in stable
    assert "the most stable is resnet18_128_clahe-on" in stable
    shown = convergence_display(conv)
    assert shown[0]["learned"] == "no: one class for 100 % of the test" and shown[1]["learned"] == "yes"


def test_a_clahe_pair_with_an_arm_that_did_not_learn_is_left_out_of_the_counts() -> None:
    def pair(arch: str, diff: float, lo: float, hi: float) -> dict:
        return {"arch": arch, "image_size": 128, "weights": "none", "seed": 0, "on": f"{arch}_128_clahe-on",
                "off": f"{arch}_128_clahe-off", "covid_auc_diff": diff, "covid_auc_ci95": [lo, hi],
                "macro_f1_diff": diff, "macro_f1_ci95": [lo, hi], "covid_auc_on": 0.8, "covid_auc_off": 0.8 - diff}

    effect = [pair("resnet18", 0.02, -0.01, 0.05), pair("vgg16", -0.15, -0.22, -0.10)]
    counted = clahe_summary(effect)
    assert "for 1 of 2 architectures" in counted and "below zero for 1" in counted
    flagged = clahe_summary(effect, {"vgg16_128_clahe-on"})
    assert "for 1 of 1 architectures" in flagged and "below zero for 0" in flagged
    assert "Left out of these counts: vgg16, whose vgg16_128_clahe-on did not learn" in flagged
    notes = [r["note"] for r in clahe_display(effect, {"vgg16_128_clahe-on"})]
    assert notes == ["", "vgg16_128_clahe-on did not learn"]


def test_the_training_time_column_counts_every_sitting_of_a_resumed_run() -> None:
    # a run resumed before the loop summed its sittings recorded only the last one in train_seconds
    run = {"name": "vgg16_128_clahe-off", "status": "ok", "arch": "vgg16", "image_size": 128, "clahe": False,
           "metrics": {}, "train_seconds": 845.0, "epoch_seconds_sum": 6191.5}
    rows = table_rows({"runs": [run, {**run, "name": "old", "epoch_seconds_sum": None}], "reference": STUDY_REFERENCE})
    assert [r["train_seconds"] for r in rows[:2]] == [6191.5, 845.0]
