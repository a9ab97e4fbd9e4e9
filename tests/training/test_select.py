"""`cxrscreen select`: the held-out figures, the config checks, and one small run on generated images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.data.splits import split_grouped, write_split
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.evaluate import evaluate_run
from cxrscreen.predict.predictor import load_model
from cxrscreen.training.head import HeadRecipe, fit_head_run
from cxrscreen.training.select import (
    Candidate,
    SelectConfig,
    evaluate_ensemble,
    held_out_figures,
    merge_results,
    select_markdown,
    summarise,
)
from tests.conftest import synthetic_cxr

pytestmark = pytest.mark.usefixtures("one_thread")
LESION = {"covid": (60, 28), "normal": None, "pneumonia": (30, 68)}


def test_held_out_figures_pick_the_auc_the_source_allows() -> None:
    groups = [str(i) for i in range(6)]
    p = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [0.3, 0.5, 0.2],
                  [0.1, 0.1, 0.8]])
    covid_src = held_out_figures(np.array([0, 0, 1, 2, 1, 2]), p, groups, n_boot=20)
    assert covid_src["auc_kind"] == "covid_vs_rest" and covid_src["auc"]["value"] == 1.0
    assert covid_src["headline"] == 1.0
    nih = held_out_figures(np.array([1, 1, 2, 2, 1, 2]), p, groups, n_boot=20)
    assert nih["auc_kind"] == "pneumonia_vs_normal"
    one = held_out_figures(np.array([0] * 6), p, groups, n_boot=20)
    assert one["auc"] is None and one["recall"]["covid"]["value"] == pytest.approx(2 / 6)
    assert one["headline"] == pytest.approx(2 / 6) and one["headline_kind"] == "lowest recall"


def test_select_config_errors_name_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("data: {cxr: a, siim: b}\nsplits: {cxr: a.csv, siim: b.csv}\ncandidates: [{name: x}]\n")
    with pytest.raises(CXRError, match="external"):
        SelectConfig.from_yaml(cfg)
    cfg.write_text("data: {cxr: a, siim: b, external: c}\nsplits: {cxr: a.csv, siim: b.csv}\n"
                   "candidates: [{name: x, train_on: [mars]}]\n")
    with pytest.raises(CXRError, match="train_on"):
        SelectConfig.from_yaml(cfg)


def _part(root: Path, sources: dict[str, list[str]], n: int, seed: int) -> tuple[Path, Path]:
    (root / "images").mkdir(parents=True)
    rows = []
    for source, labels in sources.items():
        for label in labels:
            for k in range(n):
                img = synthetic_cxr(96, 96, lesion=LESION[label], seed=seed + 31 * k + len(rows))
                name = f"images/{source}_{label}_{k}.png"
                assert cv2.imwrite(str(root / name), np.rint(img * 255).astype(np.uint8))
                g = f"{source}{label}{k}"
                rows.append({"image": name, "label": label, "source": source, "patient_id": g, "split_group": g})
    df = pd.DataFrame(rows)
    df.to_csv(root / "manifest.csv", index=False)
    split = write_split(split_grouped(df, seed=0, test_frac=0.3, val_frac=0.2), root / "split.csv")
    return root, Path(split)


def test_select_runs_every_table_on_generated_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRSCREEN_CACHE", str(tmp_path / "cache"))
    cxr, cxr_split = _part(tmp_path / "cxr", {"web": ["covid", "pneumonia"], "hosp": ["normal", "pneumonia"]}, 5, 0)
    siim, siim_split = _part(tmp_path / "siim", {"siim": ["covid", "normal"]}, 5, 500)
    ext, _ = _part(tmp_path / "ext", {"far": ["covid", "normal"]}, 3, 900)
    cfg = tmp_path / "select.yaml"
    cfg.write_text(json.dumps({
        "data": {"cxr": str(cxr), "siim": str(siim), "external": str(ext)},
        "splits": {"cxr": str(cxr_split), "siim": str(siim_split)}, "n_boot": 20,
        "candidates": [{"name": "deep", "head": {"image_size": 64, "stages": ["blocks.5"], "cs": [0.1, 1.0]}},
                       {"name": "cxr-only", "train_on": ["cxr"], "head": {"image_size": 64, "stages": ["blocks.3"]}}],
    }))
    res = CliRunner().invoke(app, ["select", "--config", str(cfg), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "select.json").read_text())
    assert result["best"] in ("deep", "cxr-only")
    deep, cxr_only = result["candidates"]
    assert set(deep["loso"]) == {"web", "hosp", "siim"}
    assert deep["loso"]["siim"]["refitted"] and not cxr_only["loso"]["siim"]["refitted"]
    assert cxr_only["train_images"] < deep["train_images"]
    assert deep["external"]["n"] == 6 and deep["external"]["covid_vs_rest"]["auc"]["ci95"] is not None
    md = (tmp_path / "out" / "select.md").read_text()
    assert "Leave-one-source-out" in md and "cxr-only" in md


def _row(name: str, score: float | None, worst: dict | None = None) -> dict:
    fig = {"value": 0.8, "ci95": [0.7, 0.9]}
    rep = {"accuracy": 0.8, "macro_f1": 0.7, "covid_vs_rest": {"sensitivity": fig, "specificity": fig, "auc": fig}}
    return {"name": name, "train_on": ["cxr"], "recipe": {}, "chosen_C": 0.01, "train_images": 10,
            "cxr_test": rep, "siim_test": rep, "external": rep, "score": score, "worst_held_out": worst,
            "loso": {} if worst is None else {"nih": {"auc_kind": None, "auc": None, "headline": worst["figure"],
                                                      "recall": {"normal": fig}}}, "seconds": {}}


def _result(*rows: dict, n_boot: int = 500) -> dict:
    return {"best": None, "chosen_by": "score", "candidates": list(rows), "n_boot": n_boot,
            "data": {"cxr": "a"}, "splits": {"cxr": "a.csv"}}


def test_merge_results_puts_every_candidate_in_one_table_and_names_the_best_scored() -> None:
    worst = {"source": "nih", "figure": 0.6, "kind": "lowest recall"}
    merged = merge_results([_result(_row("a", 0.70, worst), _row("b", 0.65, worst)),
                            _result(_row("c", 0.72, worst)), _result(_row("ens", None))],
                           ["one.json", "two.json", "three.json"])
    assert [c["name"] for c in merged["candidates"]] == ["a", "b", "c", "ens"]
    assert merged["best"] == "c" and merged["merged_from"] == ["one.json", "two.json", "three.json"]
    md = select_markdown(merged)
    assert "Best: **c**" in md
    ens_lines = [line for line in md.splitlines() if line.startswith("| ens |")]
    assert len(ens_lines) == 2 and all(line.endswith("n/a |") for line in ens_lines)  # no score, no held-out
    assert "nih 0.600 (lowest recall)" in md


def test_merge_results_refuses_repeated_names_and_other_protocols() -> None:
    with pytest.raises(CXRError, match="more than one"):
        merge_results([_result(_row("a", 0.7)), _result(_row("a", 0.6))])
    with pytest.raises(CXRError, match="n_boot"):
        merge_results([_result(_row("a", 0.7)), _result(_row("b", 0.6), n_boot=20)])
    with pytest.raises(CXRError, match="no selection"):
        merge_results([])


def test_ensemble_rows_average_a_finetuned_run_with_the_frozen_head(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXRSCREEN_CACHE", str(tmp_path / "cache"))
    cxr, cxr_split = _part(tmp_path / "cxr", {"web": ["covid", "pneumonia"], "hosp": ["normal", "pneumonia"]}, 4, 0)
    siim, siim_split = _part(tmp_path / "siim", {"siim": ["covid", "normal"]}, 4, 500)
    ext, _ = _part(tmp_path / "ext", {"far": ["covid", "normal"]}, 3, 900)
    # the "fine-tuned" model: any run directory with its own preprocessing (72 px here, the head's 64 px)
    run_dir = tmp_path / "ft"
    fit_head_run(HeadRecipe(image_size=72, stages=["blocks.4"], cs=[0.1]), cxr, cxr_split, run_dir,
                 log=lambda _: None, calibrate=False)
    cfg = SelectConfig(data={"cxr": cxr, "siim": siim, "external": ext}, splits={"cxr": cxr_split, "siim": siim_split},
                       candidates=[Candidate("frozen", ["cxr", "siim"], HeadRecipe(image_size=64, stages=["blocks.5"],
                                                                                   cs=[0.1]))], n_boot=20)
    alone, both = evaluate_ensemble(cfg.candidates[0], cfg, run_dir, 0.1, log=lambda _: None)
    ref = evaluate_run(load_model(run_dir), cxr, split_csv=cxr_split, subset="test", n_boot=20,
                       use_operating_point=False)
    assert alone["cxr_test"]["accuracy"] == pytest.approx(ref["accuracy"])
    assert alone["cxr_test"]["n"] == both["cxr_test"]["n"] == ref["n"]
    assert both["external"]["n"] == 6 and both["loso"] == {} and both["score"] is None
    assert both["name"] == "mean:frozen+ft" and "retrained" in both["note"]
    summary = summarise(cfg, [alone, both])
    assert summary["best"] is None and "n/a (no candidate with a score)" in select_markdown(summary)
