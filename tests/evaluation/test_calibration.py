"""Temperature scaling, the COVID operating point, and calibrate_run end to end on a tiny real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrscreen.data.splits import split_grouped, write_split
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.calibration import (
    calibrate_run,
    choose_threshold,
    fit_temperature,
    nll,
    reliability_diagram,
    run_logits,
    softmax,
)
from cxrscreen.evaluation.evaluate import run_probabilities
from cxrscreen.evaluation.metrics import binary_rates, ece_from_bins, expected_calibration_error, reliability_bins
from cxrscreen.predict.predictor import Predictor
from cxrscreen.runs.run_dir import load_run
from cxrscreen.training.config import TrainConfig
from cxrscreen.training.train import train
from cxrscreen.transforms.preprocess import PreprocessConfig


def _calibrated_problem(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated 3-class logits and labels drawn from softmax(logits): calibrated at T = 1."""
    rng = np.random.default_rng(seed)
    centre = rng.integers(0, 3, n)
    logits = rng.normal(0.0, 1.0, (n, 3))
    logits[np.arange(n), centre] += 3.0
    p = softmax(logits)
    labels = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    return logits, labels


@pytest.mark.parametrize(("scale", "overconfident"), [(4.0, True), (0.25, False)])
def test_temperature_scaling_fixes_miscalibration(scale: float, overconfident: bool):
    logits, labels = _calibrated_problem()
    z = logits * scale
    t = fit_temperature(z, labels)
    assert (t > 1.0) if overconfident else (t < 1.0)
    assert t == pytest.approx(scale, rel=0.25)
    ece_before = expected_calibration_error(labels, softmax(z))
    ece_after = expected_calibration_error(labels, softmax(z, t))
    assert ece_after < ece_before and ece_after < 0.05
    assert nll(z, labels, t) < nll(z, labels)
    assert fit_temperature(z, labels) == t  # deterministic


def test_temperature_is_clamped_and_inputs_checked():
    logits, labels = _calibrated_problem(500)
    assert fit_temperature(logits * 1000.0, labels) == 20.0
    with pytest.raises(CXRError):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, int))
    with pytest.raises(CXRError):
        fit_temperature(logits, labels[:-1])


@pytest.mark.parametrize("target", [0.95, 0.9, 0.5, 1.0])
def test_choose_threshold_is_highest_reaching_target(target: float):
    rng = np.random.default_rng(1)
    is_covid = rng.random(400) < 0.3
    p = np.clip(np.where(is_covid, rng.beta(5, 2, 400), rng.beta(2, 5, 400)), 0, 1)
    p[:5] = p[5]  # ties
    op = choose_threshold(p, is_covid, target)
    t = op["threshold"]
    sens, spec = binary_rates(is_covid, p >= t)
    assert sens >= target and op["val_sensitivity"] == sens and op["val_specificity"] == spec
    higher, _ = binary_rates(is_covid, p >= np.nextafter(t, 2.0))
    assert higher < target
    assert op["n_val_covid"] == int(is_covid.sum()) and op["n_val_other"] == int((~is_covid).sum())
    assert op["target_sensitivity"] == target


def test_choose_threshold_needs_covid_cases():
    with pytest.raises(CXRError, match="no COVID"):
        choose_threshold(np.array([0.1, 0.7]), np.array([False, False]))
    with pytest.raises(CXRError, match="target"):
        choose_threshold(np.array([0.1, 0.7]), np.array([True, False]), 1.5)


def test_reliability_diagram_writes_png(tmp_path: Path):
    logits, labels = _calibrated_problem(600)
    before = reliability_bins(labels, softmax(logits * 3))
    after = reliability_bins(labels, softmax(logits))
    assert ece_from_bins(before) == pytest.approx(expected_calibration_error(labels, softmax(logits * 3)))
    path = reliability_diagram(before, after, tmp_path / "sub" / "rel.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_run(data_dir: Path, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """A 60-image manifest (20 per label) of real files, its split, and a 1-epoch resnet18 at 48 px."""
    df = pd.read_csv(data_dir / "manifest.csv", dtype=str, keep_default_na=False)
    sub = pd.concat([g.sample(20, random_state=0) for _, g in df.groupby("label")]).reset_index(drop=True)
    sub["image"] = [str(data_dir / p) for p in sub["image"]]
    tmp = tmp_path_factory.mktemp("calib")
    sub.to_csv(tmp / "manifest.csv", index=False)
    write_split(split_grouped(sub, seed=0, test_frac=0.3, val_frac=0.3), tmp / "split.csv")
    cfg = TrainConfig(arch="resnet18", epochs=1, batch_size=16, cache_dir=str(tmp / "cache"),
                      preprocess=PreprocessConfig(image_size=48))
    train(cfg, tmp, tmp / "split.csv", tmp / "run", log=lambda s: None)
    return tmp / "run", tmp, tmp / "split.csv", tmp / "cache"


@pytest.mark.slow
def test_calibrate_run_end_to_end(tiny_run):
    run_dir, data, split, cache = tiny_run
    before = json.loads((run_dir / "config.json").read_text())
    res = calibrate_run(run_dir, data, split, target_sensitivity=0.95, cache_dir=cache, n_boot=50)
    cfg = json.loads((run_dir / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k not in ("calibration", "operating_point", "decision")} == before
    # the shipped rule is the candidate with the higher worst per-source rate on val
    choice = res["decision"]
    worst = {c["rule"]["rule"]: c["worst"] for c in choice["candidates"]}
    assert set(worst) == {"argmax", "operating_point"} and cfg["decision"] == choice["chosen"]
    assert worst[cfg["decision"]["rule"]] == max(worst.values())
    cal, op = cfg["calibration"], cfg["operating_point"]
    t = cal["temperature"]
    assert cal["method"] == "temperature" and cal["fitted_on"] == "val" and 0.05 <= t <= 20
    assert cal["n_val"] == res["val"]["n"] > 0
    for k in ("ece_val_before", "ece_val_after", "ece_test_before", "ece_test_after"):
        assert 0.0 <= cal[k] <= 1.0
    assert res["val"]["nll_after"] <= res["val"]["nll_before"] + 1e-9
    assert op["class"] == "covid" and op["chosen_on"] == "val" and op["target_sensitivity"] == 0.95
    assert op["val_sensitivity"] >= 0.95
    for k in ("test_sensitivity", "test_specificity"):
        assert set(op[k]) == {"value", "ci95"}
    assert res["test"]["covid_vs_rest"]["threshold"] == op["threshold"]
    # specificity per source at the threshold: every val source listed, counts and rates consistent
    per = op["val_specificity_per_source"]
    assert set(per) == set(op["val_sources"])
    n_neg = sum(v["n_non_covid"] for v in per.values())
    pooled = sum(v["specificity"] * v["n_non_covid"] for v in per.values() if v["specificity"] is not None)
    assert n_neg > 0 and pooled / n_neg == pytest.approx(op["val_specificity"])
    assert (run_dir / "eval" / "reliability.png").stat().st_size > 1000
    assert json.loads((run_dir / "eval" / "calibration.json").read_text())["calibration"] == cal

    run = load_run(run_dir)
    assert run.temperature == t and run.covid_threshold == op["threshold"]
    thr, eps = op["threshold"], 1e-4
    assert run.decision_rule().to_dict() == cfg["decision"]
    pred = Predictor(run, rule=run.decision_rule(threshold=thr))
    rest = 1 - thr - eps
    above = np.array([thr + eps, rest, 0.0]) if thr < 0.5 - eps else np.array([thr + eps, 0.0, rest])
    below = np.array([thr - eps, 1 - thr + eps, 0.0]) if thr > eps else None
    assert pred.decide(above) == "covid"
    if below is not None:
        assert pred.decide(below) != "covid"
    # a row where the stored threshold and the arg-max disagree: p(covid) just above the threshold but not
    # the largest (thr < 0.45), or just below it but the largest (thr >= 0.45 > 1/3)
    assert list(run.classes) == ["covid", "normal", "pneumonia"]
    by_argmax = Predictor(run, rule=run.decision_rule(argmax=True))
    if thr < 0.45:
        row = np.array([thr + eps, 0.0, 1 - thr - eps])
        assert by_argmax.decide(row) == "pneumonia" and pred.decide(row) == "covid"
    else:
        r = 1 - thr + eps
        row = np.array([thr - eps, 0.6 * r, 0.4 * r])  # not covid: the most probable of the other classes
        assert by_argmax.decide(row) == "covid" and pred.decide(row) == "normal"

    images = np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8)
    np.testing.assert_allclose(softmax(run_logits(run, images)),
                               run_probabilities(run, images, calibrated=False), atol=1e-5)

    again = calibrate_run(run_dir, data, split, cache_dir=cache, n_boot=50)  # refit ignores the stored T
    assert again["calibration"]["temperature"] == t and again["operating_point"]["threshold"] == thr
