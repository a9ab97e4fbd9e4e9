"""Severity in predict: the JSON / CSV / text fields, and none for a normal call or a flagged image."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.errors import CXRError
from cxrscreen.io.xray import read_xray
from cxrscreen.predict.predictor import Predictor
from cxrscreen.runs.decision import DecisionRule
from cxrscreen.runs.run_dir import LoadedRun
from cxrscreen.severity.scorer import SeverityScorer

COVID = DecisionRule(threshold=0.0)  # every image is called covid: severity applies


class RejectAll:
    def flags(self, xray: Any) -> list[str]:
        return ["not a chest X-ray"]


def _check(sev: dict[str, Any], hw: tuple[int, int]) -> None:
    assert 0 <= sev["geographic_extent"] <= 8 and 0 <= sev["opacity"] <= 6
    assert set(sev["per_lung"]) == {"right", "left"}
    assert all(0 <= v <= 4 for v in sev["per_lung"].values())
    assert sum(sev["per_lung"].values()) == pytest.approx(sev["geographic_extent"], abs=0.02)
    assert [z["brixia"] for z in sev["zones"]] == list("ABCDEF")
    for lg in ("right", "left"):
        mine = [z["extent_estimate"] for z in sev["zones"] if z["lung"] == lg]
        assert np.mean(mine) == pytest.approx(sev["per_lung"][lg], abs=0.02)
    assert set(sev["lung_boxes_source"].values()) <= {"segmentation", "atlas"}
    assert all(0 <= z["brixia_score"] <= 3 for z in sev["zones"])
    rx0, _, rx1, _ = sev["lung_boxes"]["right"]
    assert rx1 < sev["lung_boxes"]["left"][0] and rx1 <= hw[1]  # the right lung on the viewer's left
    assert "estimate" in sev["estimate"]


def test_predictor_adds_severity_only_when_not_normal_and_not_flagged(sev_run: LoadedRun, xray_png: Path) -> None:
    scorer = SeverityScorer.for_run(sev_run)
    xray = read_xray(xray_png)
    res = Predictor(sev_run, rule=COVID, severity=scorer).predict_xray(xray)
    assert res.label == "covid"
    _check(res.severity, xray.pixels.shape)
    normal = Predictor(sev_run, rule=COVID, severity=scorer)
    normal.decide = lambda probs: "normal"  # type: ignore[method-assign]
    assert normal.predict_xray(xray).severity is None
    flagged = Predictor(sev_run, rule=COVID, gate=RejectAll(), severity=scorer).predict_xray(xray)
    assert flagged.flags and flagged.severity is None
    assert scorer.applies({"class": "pneumonia", "flags": [], "error": None})
    assert not scorer.applies({"class": None, "flags": [], "error": "bad file"})


def test_scorer_refuses_another_classifiers_features(sev_run: LoadedRun) -> None:
    from cxrscreen.severity.model import SeverityRegressor

    reg = SeverityRegressor.load(sev_run.run_dir)
    reg.meta["classifier_weights_sha256"] = "0" * 64
    with pytest.raises(CXRError, match="another classifier"):
        SeverityScorer(reg, sev_run)


def _rows(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_cli_predict_severity_json_csv_text_and_heatmap(sev_run: LoadedRun, xray_png: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import cxrscreen.cli.predict

    monkeypatch.setattr(cxrscreen.cli.predict, "_load_gate", lambda run: None)
    base = ["predict", str(xray_png), "--model", str(sev_run.run_dir), "--threshold", "0", "--severity"]
    r = CliRunner().invoke(app, [*base, "--json", "--heatmap", str(tmp_path / "hm")])
    assert r.exit_code == 0, r.output
    row = _rows(r.stdout)[0]
    sev = row["severity"]
    assert {"geographic_extent", "opacity", "per_lung", "zones"} <= set(sev)
    _check(sev, (120, 100))
    hm = cv2.imread(row["heatmap"])
    assert hm.shape[1] == 100 and hm.shape[0] > 120  # bands above (caption) and below (zones' scores)
    r = CliRunner().invoke(app, [*base, "--csv"])
    assert r.exit_code == 0, r.output
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert float(table[0]["geographic_extent"]) == pytest.approx(sev["geographic_extent"], abs=0.01)
    assert table[0]["zones"].startswith("A:") and "lung_boxes_source" in table[0]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0 and "severity: extent" in r.stdout
    r = CliRunner().invoke(app, ["predict", str(xray_png), "--model", str(sev_run.run_dir), "--json"])
    assert "severity" not in _rows(r.stdout)[0]  # only when asked


def test_cli_predict_severity_none_when_flagged(sev_run: LoadedRun, xray_png: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import cxrscreen.cli.predict

    monkeypatch.setattr(cxrscreen.cli.predict, "_load_gate", lambda run: RejectAll())
    r = CliRunner().invoke(app, ["predict", str(xray_png), "--model", str(sev_run.run_dir), "--threshold", "0",
                                 "--severity", "--json"])
    row = _rows(r.stdout)[0]
    assert row["class"] is None and row["severity"] is None


def test_cli_severity_without_a_regressor_is_a_usage_error(xray_png: Path, tmp_path: Path) -> None:
    import shutil

    from cxrscreen.predict.predictor import default_model_dir

    d = tmp_path / "plain"
    shutil.copytree(default_model_dir(), d, ignore=shutil.ignore_patterns("severity.*"))
    r = CliRunner().invoke(app, ["predict", str(xray_png), "--model", str(d), "--severity"])
    assert r.exit_code == 2 and "no severity regressor" in r.output


def test_bundled_model_ships_a_small_regressor_with_its_cv_figures() -> None:
    from cxrscreen.predict.predictor import default_model_dir
    from cxrscreen.severity.model import SeverityRegressor, severity_info

    d = default_model_dir()
    assert (d / "severity.safetensors").stat().st_size < 64_000
    info = severity_info(d)
    assert info is not None and info["cv"]["geographic_extent"]["mae"]["value"] > 0
    assert SeverityRegressor.load(d).spec.backbone in ("model", "imagenet")


class FixedLungs:
    """A stand-in segmenter that returns one label map."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def segment(self, pixels: np.ndarray) -> Any:
        from cxrscreen.lungs.segmenter import LungResult

        return LungResult(self.mask)


def test_zones_are_thirds_of_the_segmented_lungs(sev_run: LoadedRun, xray_png: Path) -> None:
    from cxrscreen.severity.model import SeverityRegressor

    xray = read_xray(xray_png)
    h, w = xray.pixels.shape
    mask = np.zeros((h, w), np.uint8)
    mask[15:105, 10:45] = 1  # the right lung on the image's left, rows 15-104: thirds of 30 rows
    mask[21:99, 55:92] = 2
    sev = SeverityScorer(SeverityRegressor.load(sev_run.run_dir), sev_run, lungs=FixedLungs(mask)).score(xray)
    assert sev["lung_boxes_source"] == {"right": "segmentation", "left": "segmentation"}
    assert sev["lung_boxes"]["right"] == [10.0, 15.0, 45.0, 105.0]
    a, b, c = (z["box"] for z in sev["zones"][:3])
    assert (a[1], a[3], b[3], c[3]) == (15.0, 45.0, 75.0, 105.0)
    d = sev["zones"][3]["box"]
    assert d[0] == 55.0 and d[1] == 21.0 and d[3] == 47.0
    assert sum(sev["per_lung"].values()) == pytest.approx(sev["geographic_extent"], abs=0.02)
    # a lung the segmenter misses falls back to the atlas box
    mask[mask == 2] = 0
    sev = SeverityScorer(SeverityRegressor.load(sev_run.run_dir), sev_run, lungs=FixedLungs(mask)).score(xray)
    assert sev["lung_boxes_source"] == {"right": "segmentation", "left": "atlas"}


def test_a_lung_mask_pooled_regressor_reads_the_segmented_lungs(sev_run: LoadedRun, xray_png: Path) -> None:
    from dataclasses import replace

    from cxrscreen.lungs.masks import mask_to_model
    from cxrscreen.severity.features import FeatureExtractor
    from cxrscreen.severity.model import SeverityRegressor

    shipped = SeverityRegressor.load(sev_run.run_dir)
    spec = replace(shipped.spec, pooling="lung_masks")
    xray = read_xray(xray_png)
    h, w = xray.pixels.shape
    mask = np.zeros((h, w), np.uint8)
    mask[15:105, 10:45] = 1
    mask[21:99, 55:92] = 2
    ext = FeatureExtractor(sev_run.model, spec)
    img, geom = ext.prepare(xray.pixels)
    maps = ext.maps([img] * 12)
    x = ext.features(maps, [geom] * 12, [mask_to_model(mask, geom)] * 12)
    x = x + np.random.default_rng(0).normal(scale=0.1, size=x.shape)  # twelve distinct rows to fit on
    y = np.stack([np.linspace(0, 8, 12), np.linspace(0, 6, 12)], 1)
    reg = SeverityRegressor.fit(x, y, [f"g{i // 2}" for i in range(12)], spec, [m.shape[1] for m in maps],
                                seed=0)
    reg.meta["classifier_weights_sha256"] = shipped.meta.get("classifier_weights_sha256")
    sev = SeverityScorer(reg, sev_run, lungs=FixedLungs(mask)).score(xray)
    _check(sev, (h, w))
    grid = mask_to_model(mask, geom)
    want = reg.predict(ext.features(ext.maps([img]), [geom], [grid]))[0]
    assert sev["geographic_extent"] == pytest.approx(round(float(want[0]), 2))
    moved = np.zeros_like(mask)
    moved[60:110, 5:40] = 1
    moved[60:110, 60:95] = 2
    other = SeverityScorer(reg, sev_run, lungs=FixedLungs(moved)).score(xray)
    assert other["geographic_extent"] != sev["geographic_extent"]  # the features follow the masks
