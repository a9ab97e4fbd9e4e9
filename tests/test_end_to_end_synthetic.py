"""End to end through the CLI on generated images only (runs without ../shared): split, train 2 epochs of
a tiny resnet18 at 48 px, evaluate, predict; the figures evaluate counts are the classes predict prints."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.data.splits import split_grouped, write_split
from tests.conftest import synthetic_cxr

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["covid", "normal", "pneumonia"]
SOURCES = ["site_a", "site_b"]
PER_CLASS_AND_SOURCE = 6  # 36 images
SIZE = 96
# where the bright blob sits per class (row, col of a 96 px image): a signal the model can pick up
LESION = {"covid": (60, 28), "normal": None, "pneumonia": (30, 68)}
EVAL_KEYS = {"n", "accuracy", "macro_f1", "classes", "confusion_matrix", "covid_vs_rest", "per_source"}


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A manifest folder of 36 generated PNGs (3 classes x 2 sources x 6 patients) and a grouped split."""
    root = tmp_path_factory.mktemp("synthetic_cxr")
    (root / "images").mkdir()
    rows = []
    for ci, label in enumerate(CLASSES):
        for si, source in enumerate(SOURCES):
            for k in range(PER_CLASS_AND_SOURCE):
                seed = 100 * ci + 10 * si + k
                img = synthetic_cxr(SIZE, SIZE, lesion=LESION[label], seed=seed)
                img = np.clip(img + (0.04 if si else 0.0), 0, 1)  # the sources differ a little in exposure
                name = f"images/{label}_{source}_{k}.png"
                assert cv2.imwrite(str(root / name), np.rint(img * 255).astype(np.uint8))
                patient = f"{source}-p{ci}{k}"
                rows.append({"image": name, "label": label, "source": source, "patient_id": patient,
                             "split_group": patient})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(root / "manifest.csv", index=False)
    split = write_split(split_grouped(manifest, seed=0, test_frac=0.3, val_frac=0.2), root / "split.csv")
    return {"root": root, "split": Path(split)}


@pytest.fixture(scope="module")
def trained(synthetic_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`cxrscreen train` (the preprocessed-image cache in a temporary folder), then `evaluate --out`."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("synthetic_run")
    mp.setenv("CXRSCREEN_CACHE", str(tmp / "cache"))
    try:
        t0 = time.perf_counter()
        run_dir = tmp / "run"
        res = _invoke("train", "--data", synthetic_data["root"], "--split", synthetic_data["split"],
                      "--out", run_dir, "--arch", "resnet18", "--weights", "none", "--image-size", 48,
                      "--epochs", 2, "--batch-size", 8, "--seed", 0, "--device", "cpu")
        assert res.exit_code == 0, res.output
        eval_json = tmp / "eval" / "test.json"
        res = _invoke("evaluate", "--data", synthetic_data["root"], "--model", run_dir,
                      "--split", synthetic_data["split"], "--subset", "test", "--out", eval_json, "--n-boot", 50)
        assert res.exit_code == 0, res.output
        seconds = time.perf_counter() - t0
    finally:
        mp.undo()
    return {"run": run_dir, "eval": json.loads(eval_json.read_text()), "seconds": seconds, "tmp": tmp}


def _test_rows(synthetic_data: dict[str, Path]) -> pd.DataFrame:
    split = pd.read_csv(synthetic_data["split"], dtype=str)
    manifest = pd.read_csv(synthetic_data["root"] / "manifest.csv", dtype=str)
    return manifest.merge(split[split["subset"] == "test"], on="image")


def test_split_is_grouped_and_covers_every_class(synthetic_data: dict[str, Path]) -> None:
    split = pd.read_csv(synthetic_data["split"], dtype=str)
    manifest = pd.read_csv(synthetic_data["root"] / "manifest.csv", dtype=str).merge(split, on="image")
    assert len(manifest) == len(CLASSES) * len(SOURCES) * PER_CLASS_AND_SOURCE
    assert set(manifest["subset"]) == {"train", "val", "test"}
    assert manifest.groupby("split_group")["subset"].nunique().max() == 1
    for subset in ("train", "test"):
        assert set(manifest.loc[manifest["subset"] == subset, "label"]) == set(CLASSES), subset


def test_train_writes_a_complete_run(trained: dict) -> None:
    run = trained["run"]
    for name in ("model.safetensors", "config.json", "history.csv"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["arch"] == "resnet18" and cfg["classes"] == CLASSES
    with open(run / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert trained["seconds"] < 60, f"train + evaluate took {trained['seconds']:.1f} s"


def test_evaluate_json_follows_the_contract(trained: dict, synthetic_data: dict[str, Path]) -> None:
    ev = trained["eval"]
    assert set(ev) >= EVAL_KEYS
    test = _test_rows(synthetic_data)
    assert ev["n"] == len(test) == sum(map(sum, ev["confusion_matrix"]))
    assert [sum(r) for r in ev["confusion_matrix"]] == [int((test["label"] == c).sum()) for c in CLASSES]
    assert set(ev["classes"]) == set(CLASSES)
    assert ev["accuracy"] == pytest.approx(np.trace(ev["confusion_matrix"]) / ev["n"])
    assert 0.0 <= ev["macro_f1"] <= 1.0
    assert set(ev["covid_vs_rest"]) >= {"sensitivity", "specificity", "auc"}
    assert set(ev["per_source"]) == set(test["source"]) == set(SOURCES)
    assert sum(s["n"] for s in ev["per_source"].values()) == ev["n"]


def test_predict_prints_the_classes_evaluate_counts(trained: dict, synthetic_data: dict[str, Path]) -> None:
    """predict --json on the test images: one row each, probabilities summing to 1, and the confusion
    matrix built from predict's classes is evaluate's. The run gets a gate that accepts every image the
    hard rules pass (the bundled gate is fitted on real X-rays, not on these drawings)."""
    from cxrscreen.gate.model import GATE_FILE, Gate, bundled_gate_path

    gate = Gate.from_json(bundled_gate_path())
    gate.p_threshold, gate.novelty_threshold = 1.0, 1e12
    gate.to_json(trained["run"] / GATE_FILE)
    test = _test_rows(synthetic_data)
    paths = [synthetic_data["root"] / p for p in test["image"]]
    res = _invoke("predict", *paths, "--model", trained["run"], "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["path"]) for r in rows] == paths
    cm = np.zeros((len(CLASSES), len(CLASSES)), int)
    for row, label in zip(rows, test["label"], strict=True):
        assert row["error"] is None and row["flags"] == [], row
        assert set(row["probabilities"]) == set(CLASSES)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["decision"] == trained["eval"]["decision"] == {"rule": "argmax"}
        assert row["class"] == max(row["probabilities"], key=row["probabilities"].get)
        cm[CLASSES.index(label), CLASSES.index(row["class"])] += 1
    assert cm.tolist() == trained["eval"]["confusion_matrix"]
