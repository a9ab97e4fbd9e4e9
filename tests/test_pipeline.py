"""End to end on a small real subset of ../shared/data/cxr: train 1 epoch, evaluate, predict."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.engine import loop as engine
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.evaluate import evaluate_run
from cxrscreen.runs.run_dir import load_run
from cxrscreen.training.config import TrainConfig
from cxrscreen.training.train import train
from cxrscreen.transforms.preprocess import PreprocessConfig
from tests.conftest import read_real_manifest, write_real_subset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(data_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A 90-image manifest (30 per class, several sources) pointing at the real files, and its split."""
    df = read_real_manifest(data_dir)
    rows = pd.concat([g.sample(30, random_state=0) for _, g in df.groupby("label")])
    return write_real_subset(data_dir, rows, tmp_path_factory.mktemp("small"), test_frac=0.3, val_frac=0.2)


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(arch="resnet18", epochs=1, batch_size=16, seed=0, cache_dir=str(tmp_path / "cache"),
                preprocess=PreprocessConfig(image_size=64))
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained_run(small_data, tmp_path_factory) -> Path:
    data, split = small_data
    tmp = tmp_path_factory.mktemp("run")
    train(_cfg(tmp), data, split, tmp / "run", log=lambda s: None)
    return tmp / "run"


def test_training_writes_run_dir(trained_run: Path, small_data):
    for f in ("model.safetensors", "config.json", "history.csv", "checkpoint.pt"):
        assert (trained_run / f).is_file(), f
    cfg = json.loads((trained_run / "config.json").read_text())
    assert cfg["arch"] == "resnet18" and cfg["classes"] == ["covid", "normal", "pneumonia"]
    assert cfg["seed"] == 0 and cfg["finished"] is True
    assert cfg["versions"]["torch"].startswith("2.14.1")
    assert len(cfg["data"]["manifest_sha256"]) == 64 and len(cfg["data"]["split_sha256"]) == 64
    assert cfg["preprocess"]["clahe"] is True and cfg["preprocess"]["image_size"] == 64
    hist = pd.read_csv(trained_run / "history.csv")
    assert list(hist["epoch"]) == [1] and np.isfinite(hist["train_loss"][0]) and np.isfinite(hist["val_loss"][0])


def test_finished_run_is_not_trained_again(trained_run: Path, small_data, monkeypatch, tmp_path):
    data, split = small_data
    cfg = TrainConfig.from_dict(json.loads((trained_run / "config.json").read_text())["training"])
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: pytest.fail("retrained"))
    train(cfg, data, split, trained_run, log=lambda s: None)
    with pytest.raises(CXRError, match="another configuration"):
        train(_cfg(tmp_path, epochs=3), data, split, trained_run, log=lambda s: None)


def test_run_stored_before_a_training_option_existed_is_still_found(trained_run: Path, small_data, monkeypatch,
                                                                     tmp_path):
    data, split = small_data
    run = tmp_path / "old"
    shutil.copytree(trained_run, run)
    stored = json.loads((run / "config.json").read_text())
    cfg = TrainConfig.from_dict(stored["training"])
    del stored["training"]["boxes"]  # as written before TrainConfig had the field
    (run / "config.json").write_text(json.dumps(stored))
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: pytest.fail("retrained"))
    assert train(cfg, data, split, run, log=lambda s: None)["finished"] is True


def test_interrupted_run_resumes_from_checkpoint(small_data, tmp_path, monkeypatch):
    data, split = small_data
    real = engine.train_one_epoch
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        time.sleep(1.5)  # the first sitting's epoch takes a time the second sitting's total must include
        return real(*a, **k)

    monkeypatch.setattr(engine, "train_one_epoch", flaky)
    cfg = _cfg(tmp_path, epochs=2, preprocess=PreprocessConfig(image_size=48))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, split, tmp_path / "r", log=lambda s: None)
    assert len(pd.read_csv(tmp_path / "r" / "history.csv")) == 1
    logs: list[str] = []
    monkeypatch.setattr(engine, "train_one_epoch", real)
    train(cfg, data, split, tmp_path / "r", log=logs.append)
    assert any("resuming" in s and "epoch 1" in s for s in logs)
    hist = pd.read_csv(tmp_path / "r" / "history.csv")
    assert list(hist["epoch"]) == [1, 2]
    # the training time counts both sittings: at least the sum of the two epochs' wall times
    assert hist["seconds"].iloc[0] >= 1.5
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train_seconds"] >= hist["seconds"].sum() - 0.1


def test_a_run_killed_before_its_first_checkpoint_lists_each_epoch_once(small_data, tmp_path, monkeypatch):
    data, split = small_data
    real = engine.train_one_epoch

    def second_epoch_interrupted(*a, **k):
        if (tmp_path / "r" / "history.csv").is_file():
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "train_one_epoch", second_epoch_interrupted)
    cfg = _cfg(tmp_path, epochs=2, preprocess=PreprocessConfig(image_size=48))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, split, tmp_path / "r", log=lambda s: None)
    (tmp_path / "r" / "checkpoint.pt").unlink()  # as if killed between the history row and the checkpoint
    monkeypatch.setattr(engine, "train_one_epoch", real)
    train(cfg, data, split, tmp_path / "r", log=lambda s: None)
    assert list(pd.read_csv(tmp_path / "r" / "history.csv")["epoch"]) == [1, 2]


def test_evaluate_json_keys_and_ci_bounds(trained_run: Path, small_data, tmp_path):
    data, split = small_data
    res = evaluate_run(load_run(trained_run), data, split_csv=split, subset="test", n_boot=200,
                       cache_dir=tmp_path / "c")
    for k in ("n", "accuracy", "macro_f1", "classes", "confusion_matrix", "covid_vs_rest", "per_source", "meta"):
        assert k in res
    assert res["n"] == sum(map(sum, res["confusion_matrix"]))
    for name in ("sensitivity", "specificity", "auc"):
        d = res["covid_vs_rest"][name]
        if d["value"] is not None:
            lo, hi = d["ci95"]
            assert 0.0 <= lo <= d["value"] <= hi <= 1.0
    assert set(res["per_source"]) <= {"cohen", "covid-cxnet", "nih", "rsna"}
    assert set(res["classes"]["covid"]) >= {"precision", "recall", "f1", "auc"}


def test_weights_checksum_is_enforced(trained_run: Path, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CXRError, match="checksum mismatch"):
        load_run(bad)


def test_predict_cli_goes_past_a_bad_file(trained_run: Path, data_dir: Path, tmp_path):
    good = data_dir / "images" / "cohen" / "000001-12.jpg"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    res = CliRunner().invoke(app, ["predict", str(bad), str(good), "--model", str(trained_run), "--json"])
    assert res.exit_code == 1
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [Path(r["path"]).name for r in rows] == ["broken.png", "000001-12.jpg"]
    # the reason alone (the file is named in "path"), and no class or probabilities for it
    assert rows[0]["error"] == "not a recognised image file (expected PNG, JPEG, TIFF, BMP or DICOM)"
    assert rows[0]["class"] is None and rows[0]["probabilities"] is None
    assert f"{bad}: error: not a recognised image file" in res.stderr
    assert rows[1]["error"] is None and abs(sum(rows[1]["probabilities"].values()) - 1) < 1e-5
    assert rows[1]["class"] in ("covid", "normal", "pneumonia")
    text = CliRunner().invoke(app, ["predict", str(good), "--model", str(trained_run)])
    assert text.exit_code == 0 and "%" in text.stdout and "covid" in text.stdout


def test_predict_and_evaluate_agree_on_every_image(trained_run: Path, small_data, tmp_path):
    """Under the stored operating point, the class predict prints is the class evaluate counts."""
    from cxrscreen.evaluation.evaluate import evaluate_subset
    from cxrscreen.predict.predictor import Predictor
    from cxrscreen.runs.decision import decide_names

    data, split = small_data
    run_dir = tmp_path / "op"
    shutil.copytree(trained_run, run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    run = load_run(run_dir)
    _, sub, probs = evaluate_subset(run, data, split_csv=split, subset="test", n_boot=10, cache_dir=tmp_path / "c")
    s = np.sort(probs[:, 0])
    k = len(s) // 2  # between two images' p(covid), away from either: float noise cannot flip a class
    thr = float((s[k - 1] + s[k]) / 2)
    cfg["operating_point"] = {"class": "covid", "threshold": thr}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    run = load_run(run_dir)
    res, sub, probs = evaluate_subset(run, data, split_csv=split, subset="test", n_boot=10, cache_dir=tmp_path / "c")
    predicted = {r.path: r.label for r, _ in Predictor(run).predict_files(sub.paths)}
    assert list(predicted) == sub.paths
    classes = run.classes
    counted = decide_names(probs, classes, run.decision_rule())
    assert [predicted[p] for p in sub.paths] == counted
    assert counted != decide_names(probs, classes, run.decision_rule(argmax=True))  # the rule mattered here
    cm = np.zeros((3, 3), int)
    for y, c in zip(sub.labels, counted, strict=True):
        cm[y, classes.index(c)] += 1
    assert res["confusion_matrix"] == cm.tolist()
    assert res["decision"] == {"rule": "operating_point", "class": "covid", "threshold": thr}
    assert all(r.decision["threshold"] == thr for r, _ in Predictor(run).predict_files(sub.paths[:2]))


def test_linear_probe_then_fine_tune_moves_only_what_it_should(small_data, tmp_path):
    """Probe epochs change the head only (BatchNorm statistics included); frozen prefixes never change;
    the checkpoint is chosen by the worst source."""
    import torch

    from cxrscreen.models.registry import create_model

    data, split = small_data
    cfg = _cfg(tmp_path, arch="tf_efficientnet_lite0", weights="imagenet", epochs=2, linear_probe_epochs=1,
               linear_probe_lr=1e-2, backbone_lr_scale=0.5, frozen=["conv_stem", "bn1", "blocks.0"],
               monitor="val_worst_source_loss", preprocess=PreprocessConfig(image_size=64, mean=0.5, std=0.5))
    start = create_model("tf_efficientnet_lite0", num_classes=3, weights="imagenet").state_dict()
    probe_only = dataclasses.replace(cfg, epochs=1)
    train(probe_only, data, split, tmp_path / "lp", log=lambda s: None)
    after_lp = torch.load(tmp_path / "lp" / "checkpoint.pt", weights_only=False)["model"]
    changed = {k for k, v in after_lp.items() if v.dtype.is_floating_point and not torch.equal(v, start[k])}
    assert changed == {"classifier.weight", "classifier.bias"}

    train(cfg, data, split, tmp_path / "ft", log=lambda s: None)
    after_ft = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)["model"]
    moved = {k for k, v in after_ft.items() if v.dtype.is_floating_point and not torch.equal(v, start[k])}
    assert not any(k.startswith(("conv_stem.", "bn1.", "blocks.0.")) for k in moved)
    assert any(k.startswith("blocks.6.") for k in moved)
    hist = pd.read_csv(tmp_path / "ft" / "history.csv")
    assert list(hist["stage"]) == ["linear_probe", "fine_tune"]
    best = int(hist["val_worst_source_loss"].idxmin())
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["best_epoch"] == int(hist["epoch"][best])
