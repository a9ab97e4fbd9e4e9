"""`cxrscreen predict` against a hostile user (issue 21): bad options are one error line before any work,
nothing in a folder is skipped silently, one bad argument never stops the others, CSV cells are no
formulas."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.synthetic import write_dicom
from tests.conftest import synthetic_cxr


def _write_xray(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), (synthetic_cxr(220, 200, seed=seed) * 255).astype(np.uint8))
    return path


def _invoke(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def _usage_error(res: object, *words: str) -> None:
    """Exit 2 through typer (no traceback), nothing on stdout, one error line naming `words`."""
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    assert res.stdout == ""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ------------------------------------------------------------------------------------ options (items 8, 12)


@pytest.mark.parametrize("size", ["0", "-3"])
def test_batch_size_below_one_is_a_usage_error(tmp_path: Path, size: str) -> None:
    good = _write_xray(tmp_path / "g.png")
    _usage_error(_invoke("predict", str(good), "--batch-size", size), "--batch-size", size)
    _usage_error(_invoke("predict", str(good), "--batch-size", size, "--out", str(tmp_path / "r.csv")),
                 "--batch-size")
    assert not (tmp_path / "r.csv").exists()


def test_heatmap_on_an_existing_file_or_under_one_is_a_usage_error(tmp_path: Path) -> None:
    good = _write_xray(tmp_path / "g.png")
    taken = tmp_path / "taken"
    taken.write_text("a file")
    _usage_error(_invoke("predict", str(good), "--heatmap", str(taken)), "--heatmap", str(taken))
    _usage_error(_invoke("predict", str(good), "--heatmap", str(taken / "sub")), "--heatmap", "not a folder")
    assert taken.read_text() == "a file"


def test_out_in_a_place_that_cannot_hold_it_is_a_usage_error(tmp_path: Path) -> None:
    good = _write_xray(tmp_path / "g.png")
    taken = tmp_path / "taken"
    taken.write_text("a file")
    _usage_error(_invoke("predict", str(good), "--out", str(taken / "r.csv")), "--out", "not a folder")
    folder = tmp_path / "r.csv"
    folder.mkdir()
    _usage_error(_invoke("predict", str(good), "--out", str(folder)), "--out", "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_out_and_heatmap_in_an_unwritable_folder_are_usage_errors(tmp_path: Path) -> None:
    good = _write_xray(tmp_path / "g.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _usage_error(_invoke("predict", str(good), "--out", str(locked / "r.csv")), "--out", "not writable")
        _usage_error(_invoke("predict", str(good), "--heatmap", str(locked / "hm")), "--heatmap", "not writable")
    finally:
        locked.chmod(0o700)


def test_argmax_with_threshold_is_refused(tmp_path: Path) -> None:
    """The threshold silently won before."""
    good = _write_xray(tmp_path / "g.png")
    _usage_error(_invoke("predict", str(good), "--argmax", "--threshold", "0.2"), "--argmax", "--threshold")
    _usage_error(_invoke("predict", str(good), "--threshold", "1.5"), "--threshold")


def test_unknown_target_is_refused_before_any_image(tmp_path: Path) -> None:
    """It was checked per image, after predicting it."""
    good = _write_xray(tmp_path / "g.png")
    _usage_error(_invoke("predict", str(good), "--target", "bogus", "--heatmap", str(tmp_path / "hm")),
                 "--target", "bogus", "covid")
    assert not (tmp_path / "hm").exists()


# ------------------------------------------------------------------------------------ inputs (items 6, 7)


def test_unreadable_subfolder_is_reported_and_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable subfolder was skipped silently (exit 0). Root reads any folder, so the permission
    error is raised by a stand-in for os.scandir on that folder only."""
    root = tmp_path / "scans"
    good = _write_xray(root / "ok" / "a.png")
    _write_xray(root / "secret" / "b.png")
    real = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(os.fsdecode(path)).name == "secret":
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    res = _invoke("predict", str(root))
    assert res.exit_code == 1, res.output
    assert res.stdout.startswith(f"{good}: ")
    assert f"{root / 'secret'}: error: cannot read folder (Permission denied)" in res.stderr, res.stderr


def test_links_gif_and_unknown_files_in_a_folder_are_reported(tmp_path: Path) -> None:
    """A symlink loop, a dangling link, a .gif and a suffix-less file were skipped silently (exit 0)."""
    root = tmp_path / "scans"
    good = _write_xray(root / "a.png")
    dcm = write_dicom(root / "IM0001", (synthetic_cxr(220, 200, seed=4) * 4095).astype(np.uint16), bits_stored=12)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "gone.png").symlink_to(root / "nowhere.png")
    (root / "anim.gif").write_bytes(b"GIF89a" + bytes(20))
    (root / "README").write_text("no image")
    res = _invoke("predict", str(root))
    assert res.exit_code == 1, res.output
    assert f"{good}: " in res.stdout and f"{dcm}: " in res.stdout  # a suffix-less DICOM is screened
    assert f"{root / 'loop'}: error: symlink loop" in res.stderr, res.stderr
    assert f"{root / 'gone.png'}: error: dangling link" in res.stderr
    assert "skipped 2 file(s)" in res.stderr and "anim.gif" in res.stderr and "README" in res.stderr


def test_non_manifest_csv_given_directly_does_not_stop_the_others(tmp_path: Path) -> None:
    """It stopped every input with exit 2 before."""
    notes = tmp_path / "notes.csv"
    notes.write_text("a,b\n1,2\n")
    good = _write_xray(tmp_path / "g.png")
    res = _invoke("predict", str(notes), str(good))
    assert res.exit_code == 1, res.output
    assert res.stdout.startswith(f"{good}: ")
    assert f"{notes}: error: missing column 'image'" in res.stderr, res.stderr
    js = _invoke("predict", str(notes), str(good), "--json")
    rows = [json.loads(line) for line in js.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(notes), str(good)] and "missing column" in rows[0]["error"]
    cs = _invoke("predict", str(notes), str(good), "--csv")
    assert [r[0] for r in csv.reader(io.StringIO(cs.stdout))][1:] == [str(notes), str(good)]
    out = tmp_path / "r.jsonl"
    batch = _invoke("predict", str(notes), str(good), "--out", str(out), "--workers", "0")
    assert batch.exit_code == 1, batch.output
    rows = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows[str(good)]["error"] is None and "missing column 'image'" in rows[str(notes)]["error"]


# ------------------------------------------------------------------------------------ CSV cells (item 14)


def test_csv_outputs_hold_no_formula_and_no_control_characters(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write_xray(tmp_path / "=cmd|calc.png", seed=1)
    _write_xray(tmp_path / "a\x1bb\nc.png", seed=2)
    names = ["=cmd|calc.png", "a\x1bb\nc.png"]
    res = _invoke("predict", *names, "--csv")
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert [r[0] for r in rows[1:]] == ["'=cmd|calc.png", "a\\x1bb\\nc.png"], res.stdout
    assert len(res.stdout.splitlines()) == 3

    batch = _invoke("predict", *names, "--out", "r.csv", "--workers", "0")
    assert batch.exit_code in (0, 1), batch.output
    text = (tmp_path / "r.csv").read_text()
    cells = [r[0] for r in csv.reader(io.StringIO(text))][1:]
    assert cells == ["'=cmd|calc.png", "a\\x1bb\\nc.png"] and "\x1b" not in text
    again = _invoke("predict", *names, "--out", "r.csv", "--workers", "0", "--resume")
    summary = json.loads([ln for ln in again.stderr.splitlines() if ln.startswith("{")][0])
    assert summary["already_done"] == 2 and summary["screened"] == 0  # resume matches the escaped cells
