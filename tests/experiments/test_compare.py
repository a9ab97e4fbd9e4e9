"""`compare` end to end on 45 real images (two small models, 1 epoch, CLAHE on and off), and its config."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from cxrscreen.engine import loop as engine
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.evaluate import evaluate_run
from cxrscreen.experiments.compare import _arm_lock, merged_rows, run_compare, select_pairs
from cxrscreen.experiments.config import STUDY_REFERENCE, CompareConfig, train_config_for
from cxrscreen.experiments.report import RERUN, table_rows
from cxrscreen.runs.run_dir import load_run
from tests.conftest import read_real_manifest, write_real_subset

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "compare_tiny.yaml"
PAPER = REPO / "configs" / "compare_paper.yaml"
RUNS = ["resnet18_48_clahe-on", "resnet18_48_clahe-off", "mobilenet_v3_small_64_clahe-on",
        "mobilenet_v3_small_64_clahe-off"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(_: str) -> None:
    pass


def _fail_epoch(*args: object, **kwargs: object) -> None:
    raise RuntimeError("train_one_epoch must not run")


@pytest.fixture(scope="module")
def tiny_data(data_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """45 real images (15 per label, absolute paths) and a grouped split of them."""
    df = read_real_manifest(data_dir)
    rows = pd.concat([df[df["label"] == c].sample(15, random_state=0) for c in ("covid", "normal", "pneumonia")])
    root = tmp_path_factory.mktemp("compare")
    _, split = write_real_subset(data_dir, rows, root / "data", test_frac=0.3, val_frac=0.2)
    return {"root": root, "data": root / "data", "split": split, "cache": root / "cache"}


@pytest.fixture(scope="module")
def compared(tiny_data) -> dict:
    out = tiny_data["root"] / "report"
    result = run_compare(TINY, tiny_data["data"], tiny_data["split"], out, cache_dir=tiny_data["cache"],
                         command="cxrscreen compare --config configs/compare_tiny.yaml (test)", log=_quiet)
    return {"out": out, "result": result, **tiny_data}


@pytest.mark.slow
def test_every_run_trained_and_every_plot_written(compared) -> None:
    out, result = compared["out"], compared["result"]
    assert [r["name"] for r in result["runs"]] == RUNS
    assert all(r["status"] == "ok" and r["trained_now"] for r in result["runs"]), result["runs"]
    for name in ("curves_all.png", "roc_covid.png", "table.csv", "report.md", "report.html", "compare.json"):
        assert (out / name).is_file(), name
    for name in RUNS:
        for f in (f"curves/{name}.png", f"confusion/{name}.png", f"runs/{name}/eval/test.json",
                  f"runs/{name}/eval/test_probs.csv", f"runs/{name}/history.csv"):
            assert (out / f).is_file(), f
    assert json.loads((out / "compare.json").read_text())["complete"] is True


@pytest.mark.slow
def test_table_and_json_equal_the_runs_eval(compared) -> None:
    out = compared["out"]
    with open(out / "table.csv", newline="") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    saved = {r["name"]: r for r in json.loads((out / "compare.json").read_text())["runs"]}
    for name in RUNS:
        ev = json.loads((out / "runs" / name / "eval" / "test.json").read_text())
        c = ev["covid_vs_rest"]
        expected = {"accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"],
                    "covid_sensitivity": c["sensitivity"]["value"], "covid_specificity": c["specificity"]["value"],
                    "covid_auc": c["auc"]["value"]}
        m = saved[name]["metrics"]
        got_json = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                    "covid_sensitivity": m["covid_sensitivity"]["value"],
                    "covid_specificity": m["covid_specificity"]["value"], "covid_auc": m["covid_auc"]["value"]}
        assert got_json == expected
        assert m["covid_sensitivity"]["ci95"] == c["sensitivity"]["ci95"]
        row = table[name]
        for k, v in expected.items():
            assert (float(row[k]) if row[k] else None) == v, (name, k)
        assert float(row["covid_specificity_ci_low"]) == c["specificity"]["ci95"][0]
        assert int(row["parameters"]) == json.loads((out / "runs" / name / "config.json").read_text())["parameters"]
        assert float(row["inference_images_per_s"]) > 0
        # the ROC's probabilities agree with the eval JSON
        probs = pd.read_csv(out / "runs" / name / "eval" / "test_probs.csv")
        pred = probs[["p_covid", "p_normal", "p_pneumonia"]].to_numpy().argmax(1)
        labels = probs["label"].map(["covid", "normal", "pneumonia"].index).to_numpy()
        assert len(probs) == ev["n"] and (pred == labels).mean() == ev["accuracy"]


@pytest.mark.slow
def test_test_json_is_what_evaluate_run_gives(compared) -> None:
    name = RUNS[0]
    run = load_run(compared["out"] / "runs" / name)
    ev = evaluate_run(run, compared["data"], split_csv=compared["split"], subset="test", n_boot=50, seed=0,
                      cache_dir=compared["cache"])
    saved = json.loads((compared["out"] / "runs" / name / "eval" / "test.json").read_text())
    assert {k: v for k, v in saved.items() if k != "meta"} == json.loads(json.dumps(
        {k: v for k, v in ev.items() if k != "meta"}))
    skip = {"created", "written_by"}
    assert {k: v for k, v in saved["meta"].items() if k not in skip} == json.loads(json.dumps(
        {k: v for k, v in ev["meta"].items() if k not in skip}))


@pytest.mark.slow
def test_reference_row_and_clahe_table(compared) -> None:
    out, result = compared["out"], compared["result"]
    with open(out / "table.csv", newline="") as f:
        ref = [r for r in csv.DictReader(f) if r["source"] != RERUN]
    assert len(ref) == 1
    assert ref[0]["source"] == "reported by the study, not rerun"
    assert float(ref[0]["covid_sensitivity"]) == 0.9492 and float(ref[0]["covid_specificity"]) == 0.92
    assert ref[0]["accuracy"] == "" and ref[0]["arch"] == "ssd300_vgg16"
    md = (out / "report.md").read_text()
    assert "reported by the study, not rerun" in md and "94.92 %" in md and "104/205/204" in md
    effect = {e["arch"]: e for e in result["clahe_effect"]}
    assert set(effect) == {"resnet18", "mobilenet_v3_small"}
    e = effect["resnet18"]
    assert e["macro_f1_diff"] == result["runs"][0]["metrics"]["macro_f1"] - result["runs"][1]["metrics"]["macro_f1"]
    assert "CLAHE on vs off" in md
    meta = result["meta"]
    assert meta["config_text"] == TINY.read_text() and meta["seed"] == 0
    assert len(meta["data"]["manifest_sha256"]) == 64 and len(meta["data"]["split_sha256"]) == 64
    assert meta["command"] in md and "torch" in meta["versions"]


@pytest.mark.slow
def test_html_is_self_contained(compared) -> None:
    page = (compared["out"] / "report.html").read_text()
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(link|script)\b", page)
    srcs = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(srcs) == 2 + 2 * len(RUNS)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "reported by the study, not rerun" in page


@pytest.mark.slow
def test_second_compare_does_not_retrain(compared, monkeypatch) -> None:
    out = compared["out"]
    stamps = {n: (out / "runs" / n / "model.safetensors").stat().st_mtime_ns for n in RUNS}
    monkeypatch.setattr(engine, "train_one_epoch", _fail_epoch)
    # a new budget on the command line does not make finished runs "another configuration"
    again = run_compare(TINY, compared["data"], compared["split"], out, cache_dir=compared["cache"],
                        budget_minutes=5, log=_quiet)
    assert all(r["status"] == "ok" and not r["trained_now"] for r in again["runs"]), again["runs"]
    assert {n: (out / "runs" / n / "model.safetensors").stat().st_mtime_ns for n in RUNS} == stamps
    for old, new in zip(compared["result"]["runs"], again["runs"], strict=True):
        assert new["metrics"] == old["metrics"]


@pytest.mark.slow
def test_an_arm_another_process_holds_is_skipped_and_its_row_kept(compared, monkeypatch) -> None:
    out = compared["out"]
    monkeypatch.setattr(engine, "train_one_epoch", _fail_epoch)
    logs: list[str] = []
    with _arm_lock(out / "runs", RUNS[1]) as mine:  # as if another `cxrscreen compare` were training it
        assert mine
        again = run_compare(TINY, compared["data"], compared["split"], out, cache_dir=compared["cache"],
                            only=["resnet18_*"], log=logs.append)
    assert any(f"{RUNS[1]}: another compare process holds it" in m for m in logs)
    assert not any(m.startswith(f"{RUNS[1]}: ") and "evaluat" in m for m in logs)
    # the held arm and the two arms --only left out keep the rows compare.json had; nothing is pending
    assert [r["name"] for r in again["runs"]] == RUNS and again["complete"] and again["pending"] == []
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in compared["result"]["runs"]]
    assert json.loads((out / "compare.json").read_text())["complete"] is True


def test_arm_lock_is_exclusive_and_freed(tmp_path: Path) -> None:
    with _arm_lock(tmp_path, "a") as first, _arm_lock(tmp_path, "a") as second, _arm_lock(tmp_path, "b") as b:
        assert first and not second and b
    with _arm_lock(tmp_path, "a") as again:
        assert again
    assert "pid" in (tmp_path / ".locks" / "a.lock").read_text()


def test_only_selects_arms_by_pattern() -> None:
    cc = CompareConfig.from_yaml(TINY)
    names = [cc.run_name(e, c) for e, c in select_pairs(cc, ["*_clahe-off", "resnet18_48_clahe-on"])]
    assert names == RUNS[:2] + RUNS[3:]
    assert len(select_pairs(cc, None)) == 4
    with pytest.raises(CXRError, match="matches no arm; the arms are resnet18_48_clahe-on"):
        select_pairs(cc, ["vgg*"])


def test_merged_rows_keep_other_processes_rows_unless_the_recipe_changed(tmp_path: Path) -> None:
    cc = CompareConfig.from_yaml(TINY)
    rows = {cc.run_name(e, c): {"name": cc.run_name(e, c), "status": "ok",
                                "training": train_config_for(cc, e, c).to_dict()} for e, c in cc.pairs()}
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"runs": [rows[n] for n in RUNS[1:]]}))
    mine = {RUNS[0]: {"name": RUNS[0], "status": "ok", "mine": True}}
    assert [r["name"] for r in merged_rows(path, mine, cc)] == RUNS
    assert merged_rows(path, mine, cc)[0]["mine"]
    # another learning rate for resnet18: its stored row was trained otherwise and is not kept
    changed = CompareConfig.from_yaml(TINY)
    changed.models[0].overrides["lr"] = 0.01
    assert [r["name"] for r in merged_rows(path, {}, changed)] == RUNS[2:]
    # an unreadable compare.json is no rows, not a crash
    path.write_text("{not json")
    assert merged_rows(path, mine, cc) == [mine[RUNS[0]]]


@pytest.mark.slow
def test_failing_models_are_recorded_and_the_rest_go_on(tiny_data, monkeypatch) -> None:
    cc = CompareConfig.from_yaml(TINY)
    cc.models = CompareConfig.from_dict({"models": [{"arch": "no_such_net"}, {"arch": "resnet18", "image_size": 40}],
                                         "clahe": [True]}).models
    cc.clahe = [True]
    monkeypatch.setattr(engine, "train_one_epoch", _fail_epoch)
    out = tiny_data["root"] / "failing"
    result = run_compare(cc, tiny_data["data"], tiny_data["split"], out, cache_dir=tiny_data["cache"], log=_quiet)
    unknown, broken = result["runs"]
    assert unknown["status"] == "failed" and unknown["stage"] == "config" and "no_such_net" in unknown["error"]
    assert broken["status"] == "failed" and broken["stage"] == "train" and "must not run" in broken["error"]
    with open(out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["failed (config)", "failed (train)", "reported"]
    assert "must not run" in rows[1]["note"]
    assert (out / "report.html").is_file() and (out / "roc_covid.png").is_file()


def test_paper_config_lists_the_study_models_and_gpu_recipe() -> None:
    cc = CompareConfig.from_yaml(PAPER)
    names = [cc.run_name(e, c) for e in cc.models for c in cc.clahe]
    for n in ("densenet169_224", "vgg16_224", "inception_v3_299", "resnet152_224", "resnet18_224",
              "efficientnet_b0_224", "mobilenet_v3_large_224"):
        assert f"{n}_clahe-on" in names and f"{n}_clahe-off" in names
    assert cc.clahe == [True, False]
    cfg = train_config_for(cc, cc.models[0], False, budget_minutes=7)
    assert cfg.preprocess.clahe is False and cfg.budget_minutes == 7 and cfg.seed == cc.seed
    gpu = cc.with_gpu_recipe()
    g = train_config_for(gpu, next(e for e in gpu.models if e.arch == "inception_v3"), True)
    assert g.weights == "imagenet" and g.preprocess.image_size == 299 and g.device == "cuda"
    # the study's reported row of the table: its figures, its test set size (100 + 444 + 443) and counts
    ref = table_rows({"runs": [], "reference": STUDY_REFERENCE})[-1]
    assert ref["status"] == "reported" and ref["run"] == "study (reported)" and ref["accuracy"] is None
    assert (ref["covid_sensitivity"], ref["covid_specificity"], ref["n_test"]) == (0.9492, 0.92, 987)
    assert "train 104/205/204; test 100/444/443" in ref["note"]


def test_config_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CXRError, match="unknown keys"):
        CompareConfig.from_dict({"models": ["resnet18"], "epochs": 3})
    with pytest.raises(CXRError, match="unknown option"):
        CompareConfig.from_dict({"models": [{"arch": "resnet18", "learning_rate": 0.1}]})
    with pytest.raises(CXRError, match="same run name"):
        CompareConfig.from_dict({"models": ["resnet18", {"arch": "resnet18", "image_size": 224}]})
    with pytest.raises(CXRError, match="clahe"):
        CompareConfig.from_dict({"models": ["resnet18"], "clahe": ["yes"]})
    with pytest.raises(CXRError, match=r"models entry 1 \(resnet18\): `clahe:`"):
        CompareConfig.from_dict({"models": [{"arch": "resnet18", "clahe": "off"}]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [resnet18\n")
    with pytest.raises(CXRError, match="bad.yaml"):
        CompareConfig.from_yaml(bad)
