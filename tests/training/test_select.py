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
from cxrscreen.training.select import SelectConfig, held_out_figures
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
