"""`cxrscreen predict` for scripts and people: names printed literally, outputs that never overwrite each
other, errors on stderr, unwrapped text, exclusive formats, --version, empty folders, flagged images."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cxrscreen import __version__
from cxrscreen.cli import app
from tests.conftest import synthetic_cxr


def _write_xray(path: Path, seed: int = 0, h: int = 260, w: int = 240) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), (synthetic_cxr(h, w, seed=seed) * 255).astype(np.uint8))
    return path


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def lenient_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model (linked, not copied) with a gate whose fitted scores accept everything, so that
    synthetic images get a diagnosis and a heatmap; the hard rules still apply."""
    from cxrscreen.gate.model import GATE_FILE, Gate, bundled_gate_path
    from cxrscreen.predict.predictor import default_model_dir

    d = tmp_path_factory.mktemp("lenient_model")
    for f in default_model_dir().iterdir():
        if f.is_file() and f.name != GATE_FILE:
            (d / f.name).symlink_to(f)
    gate = Gate.from_json(bundled_gate_path())
    gate.p_threshold, gate.novelty_threshold = 1.0, 1e12
    gate.to_json(d / GATE_FILE)
    return d


def test_markup_in_file_names_is_printed_literally(tmp_path: Path) -> None:
    """'[/]x.png' used to stop the run with a rich MarkupError (the next file never processed) and
    '[red]patient.png' printed as 'patient.png'."""
    closing = _write_xray(tmp_path / "[/]x.png", seed=1)  # folder '[' holding ']x.png'
    red = _write_xray(tmp_path / "[red]patient.png", seed=2)
    good = _write_xray(tmp_path / "good.png", seed=3)
    missing = tmp_path / "[/]missing.png"
    res = _invoke("predict", str(closing), str(missing), str(red), str(good))
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.exception
    lines = res.stdout.splitlines()
    assert len(lines) == 3, res.output
    for path, line in zip((closing, red, good), lines, strict=True):
        assert line.startswith(f"{path}: "), line
    assert f"{missing}: error: file not found" in res.stderr, res.stderr


def test_control_characters_in_names_are_escaped(tmp_path: Path) -> None:
    sneaky = _write_xray(tmp_path / "a\x1b[31mb\nc.png")
    res = _invoke("predict", str(sneaky))
    assert "\x1b" not in res.stdout and res.stdout.count("\n") == 1, repr(res.stdout)
    assert "\\x1b[31mb\\nc.png" in res.stdout


def test_heatmaps_of_files_with_the_same_name_do_not_overwrite(tmp_path: Path, lenient_model: Path) -> None:
    a = _write_xray(tmp_path / "in" / "a" / "img.png", seed=1)
    b = _write_xray(tmp_path / "in" / "b" / "img.png", seed=2, h=300)
    loose = _write_xray(tmp_path / "other" / "img.png", seed=3, h=220)
    out = tmp_path / "heat"
    res = _invoke("predict", str(tmp_path / "in"), str(loose), "--json", "--heatmap", str(out),
                  "--model", str(lenient_model))
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(a), str(b), str(loose)]
    written = [Path(r["heatmap"]) for r in rows]
    assert len(set(written)) == 3 and all(p.is_file() for p in written)
    assert written[0] == out / "in" / "a" / "img_heatmap.png"  # the folder's tree is mirrored
    assert written[1] == out / "in" / "b" / "img_heatmap.png"
    heights = [cv2.imread(str(p)).shape[0] for p in written]
    band = heights[0] - 260  # the caption band above each X-ray (same width, same lines)
    assert band > 0 and heights == [260 + band, 300 + band, 220 + band]  # each its own image
    text = _invoke("predict", str(a), str(b), "--heatmap", str(out / "text"), "--model", str(lenient_model))
    assert text.exit_code == 0
    reported = [ln.split("heatmap: ")[1] for ln in text.stdout.splitlines()]
    assert len(set(reported)) == 2 and all(Path(p).is_file() for p in reported)


def test_errors_go_to_stderr_and_the_rest_goes_on(tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    good = _write_xray(tmp_path / "good.png")
    res = _invoke("predict", str(bad), str(good))
    assert res.exit_code == 1
    assert "notes.png" not in res.stdout and res.stdout.startswith(f"{good}: ")
    assert "notes.png" in res.stderr and "not a recognised image" in res.stderr
    js = _invoke("predict", str(bad), str(good), "--json")
    rows = [json.loads(line) for line in js.stdout.splitlines()]
    assert [r["error"] is None for r in rows] == [False, True]  # every input accounted for in the JSON
    assert "notes.png" in js.stderr


def test_text_output_does_not_wrap_when_piped(tmp_path: Path) -> None:
    deep = _write_xray(tmp_path / ("a_rather_long_folder_name_" * 4) / "chest_xray_with_a_long_name.png")
    res = _invoke("predict", str(deep))
    assert res.exit_code == 0
    assert len(res.stdout.splitlines()) == 1 and len(res.stdout) > 120, res.stdout


def test_json_and_csv_exclude_each_other(tmp_path: Path) -> None:
    res = _invoke("predict", str(_write_xray(tmp_path / "x.png")), "--json", "--csv")
    assert res.exit_code == 2 and res.stdout == ""
    assert "--json" in res.stderr and "--csv" in res.stderr


def test_version() -> None:
    res = _invoke("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"cxrscreen {__version__}"


def test_empty_folder_is_an_error_and_other_inputs_go_on(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    good = _write_xray(tmp_path / "good.png")
    res = _invoke("predict", str(empty), str(good))
    assert res.exit_code != 0
    assert "no image files" in res.stderr and str(empty) in res.stderr
    assert res.stdout.startswith(f"{good}: ")
    assert _invoke("predict", str(empty)).exit_code != 0


def test_boolean_flags_show_no_metavar() -> None:
    res = _invoke("predict", "--help")
    assert res.exit_code == 0 and "--json" in res.stdout and "--csv" in res.stdout
    assert "<bool>" not in res.stdout


@pytest.fixture()
def blank_png(tmp_path: Path) -> Path:
    path = tmp_path / "blank.png"
    assert cv2.imwrite(str(path), np.full((200, 200), 128, np.uint8))
    return path


def test_flagged_image_gets_no_probabilities_in_any_output(blank_png: Path, tmp_path: Path) -> None:
    js = _invoke("predict", str(blank_png), "--json", "--heatmap", str(tmp_path / "hm"))
    row = json.loads(js.stdout)
    assert row["class"] is None and row["flags"] and row["flags"][0].startswith("blank image")
    assert row["probabilities"] is None and row.get("heatmap") is None
    cs = _invoke("predict", str(blank_png), "--csv")
    header, values = list(csv.reader(io.StringIO(cs.stdout)))
    rec = dict(zip(header, values, strict=True))
    assert rec["class"] == "" and all(rec[k] == "" for k in header if k.startswith("p_")), rec
    text = _invoke("predict", str(blank_png))
    assert "no diagnosis" in text.stdout and "%" not in text.stdout.replace("blank image", "")


def test_detector_heatmap_is_the_same_boxes_picture_as_the_server_gives(tmp_path: Path, monkeypatch) -> None:
    """`predict --heatmap` with a detector writes its task drawer's picture (the boxes), the very array the
    server sends for heatmap=true: one drawing path."""
    import base64

    from fastapi.testclient import TestClient

    from cxrscreen.gate.model import GATE_FILE, Gate, bundled_gate_path, gate_for_run
    from cxrscreen.models.detectors import create_detector
    from cxrscreen.runs.run_dir import load_run, save_weights, write_config
    from cxrscreen.serving import create_app
    from cxrscreen.tasks import detection
    from cxrscreen.transforms.preprocess import PreprocessConfig

    arch, run_dir = "ssdlite320_mobilenet_v3_large", tmp_path / "run"
    run_dir.mkdir()
    sha = save_weights(create_detector(arch, num_classes=3), run_dir)
    write_config(run_dir, {"arch": arch, "kind": "detector", "classes": ["covid", "normal", "pneumonia"],
                           "preprocess": PreprocessConfig(image_size=64).to_dict(), "weights_sha256": sha})
    gate = Gate.from_json(bundled_gate_path())
    gate.p_threshold, gate.novelty_threshold = 1.0, 1e12  # synthetic X-rays get a diagnosis
    gate.to_json(run_dir / GATE_FILE)
    found = {"boxes": np.array([[10.0, 12.0, 44.0, 50.0]], np.float32), "labels": np.array([1]),
             "scores": np.array([0.8], np.float32)}
    monkeypatch.setattr(detection, "detect", lambda model, images, **kw: [found for _ in images])
    img = _write_xray(tmp_path / "in" / "chest.png")
    res = _invoke("predict", str(img), "--json", "--model", str(run_dir), "--heatmap", str(tmp_path / "hm"))
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.splitlines()[-1])
    assert row["class"] == "covid" and Path(row["heatmap"]).name == "chest_boxes.png"
    written = cv2.imread(row["heatmap"], cv2.IMREAD_COLOR)
    assert written.shape == (260, 240, 3) and (np.ptp(written.astype(int), axis=2) > 40).any()
    run = load_run(run_dir)
    r = TestClient(create_app(run, gate=gate_for_run(run))).post(
        "/api/predict", params={"heatmap": "true"}, files={"file": ("chest.png", img.read_bytes(), "image/png")})
    served = cv2.imdecode(np.frombuffer(base64.b64decode(r.json()["heatmap_png_base64"]), np.uint8),
                          cv2.IMREAD_COLOR)
    assert np.array_equal(served, written)
