"""Batch screening (`cxrscreen predict --out`): streamed rows, bad files recorded, kill + resume equals an
uninterrupted run, torn rows redone, deterministic disjoint shards, manifests as input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.errors import CXRError
from cxrscreen.predict.batch import ResultWriter, Shard, read_results
from cxrscreen.predict.inputs import ImageInput, gather
from tests.batch_fixtures import CLASSES, make_tiny_run, write_images
from tests.processes import kill_tree

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("archive") / "scans"
    write_images(folder, 40)
    return folder


def _predict(*args: str) -> object:
    return CliRunner().invoke(app, ["predict", *args])


def _by_path(rows: list[dict]) -> dict[str, dict]:
    out = {r["path"]: r for r in rows}
    assert len(out) == len(rows), "a path has more than one row"
    return out


def _same(a: dict[str, dict], b: dict[str, dict], tol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for p, ra in a.items():
        rb = b[p]
        assert ra["class"] == rb["class"] and ra["error"] == rb["error"] and ra["flags"] == rb["flags"], p
        if ra["probabilities"] is None:
            assert rb["probabilities"] is None
        else:
            for c in CLASSES:
                assert abs(ra["probabilities"][c] - rb["probabilities"][c]) <= tol, (p, c)


@pytest.fixture(scope="module")
def reference(tiny_run: Path, scans: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """An uninterrupted run over the folder, decoding in this process."""
    out = tmp_path_factory.mktemp("ref") / "full.csv"
    res = _predict(str(scans), "--model", str(tiny_run), "--out", str(out), "--batch-size", "4", "--workers", "0")
    assert res.exit_code == 1, res.output  # the broken file
    return _by_path(read_results(out))


def test_every_input_has_one_row_and_bad_files_record_their_error(reference: dict[str, dict]) -> None:
    assert len(reference) == 41
    bad = [r for r in reference.values() if r["error"]]
    assert len(bad) == 1 and bad[0]["path"].endswith("broken_0.png") and bad[0]["probabilities"] is None
    good = [r for r in reference.values() if not r["error"]]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-6 and r["class"] in CLASSES for r in good)


def test_workers_and_jsonl_give_the_same_rows(tiny_run: Path, scans: Path, tmp_path: Path,
                                              reference: dict[str, dict]) -> None:
    out = tmp_path / "w2.jsonl"
    res = _predict(str(scans), "--model", str(tiny_run), "--out", str(out), "--batch-size", "8", "--workers", "2")
    assert res.exit_code == 1, res.output
    rows = read_results(out)
    assert [r["path"] for r in rows] == list(reference)  # input order, as the single-process run wrote it
    assert all(r["decision"] == {"rule": "argmax"} for r in rows if not r["error"])
    _same(_by_path(rows), reference)


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tiny_run: Path, scans: Path, tmp_path: Path,
                                                        reference: dict[str, dict]) -> None:
    out = tmp_path / "killed.csv"
    cmd = [sys.executable, "-m", "cxrscreen.cli", "predict", str(scans), "--model", str(tiny_run), "--out",
           str(out), "--batch-size", "2", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if out.is_file() and out.read_text().count("\n") >= 2:  # header + the first batch
            break
        time.sleep(0.005)
    kill_tree(proc.pid)
    proc.wait()
    partial = read_results(out)
    assert 1 <= len(partial) < 41, f"{len(partial)} rows: the run was not killed mid-way"
    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr  # 1: the broken file
    summary = json.loads([line for line in res.stderr.splitlines() if line.startswith("{")][-1])
    assert summary["already_done"] == len(partial) and summary["screened"] == 41 - len(partial)
    final = read_results(out)
    assert [r["path"] for r in final[: len(partial)]] == [r["path"] for r in partial]  # finished rows kept
    _same(_by_path(final), reference)


def test_torn_last_row_is_redone_and_other_files_refused(tiny_run: Path, scans: Path, tmp_path: Path,
                                                         reference: dict[str, dict]) -> None:
    out = tmp_path / "torn.csv"
    assert _predict(str(scans), "--model", str(tiny_run), "--out", str(out), "--workers", "0").exit_code == 1
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:6]) + lines[6][:25])  # 5 rows and a row cut inside its path
    again = _predict(str(scans), "--model", str(tiny_run), "--out", str(out), "--workers", "0")
    assert again.exit_code == 2 and "pass --resume" in again.stderr  # never overwritten silently
    res = _predict(str(scans), "--model", str(tiny_run), "--out", str(out), "--workers", "0", "--resume")
    assert res.exit_code == 1, res.output
    assert '"already_done": 5' in res.stderr
    _same(_by_path(read_results(out)), reference)
    other = tmp_path / "other.csv"
    other.write_text("path,label\nx.png,covid\n")
    res = _predict(str(scans), "--model", str(tiny_run), "--out", str(other), "--resume")
    assert res.exit_code == 2 and "other.csv" in res.stderr and "columns" in res.stderr


def test_torn_jsonl_line_is_dropped(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    rows = [{"path": f"p{i}.png", "class": "covid"} for i in range(3)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"path": "p3.png", "cla')
    w = ResultWriter(out, CLASSES, resume=True)
    w.write([{"path": "p3.png", "class": "normal"}])
    w.close()
    assert w.done == {"p0.png", "p1.png", "p2.png"}
    assert [r["path"] for r in read_results(out)] == ["p0.png", "p1.png", "p2.png", "p3.png"]
    with pytest.raises(CXRError, match="suffix"):
        ResultWriter(tmp_path / "r.txt", CLASSES)


def test_shards_are_disjoint_cover_everything_and_ignore_order_and_mount_point(scans: Path) -> None:
    inputs = gather([scans]).inputs
    parts = [Shard(i, 3).select(inputs) for i in range(3)]
    labels = [sorted(str(x.label) for x in p) for p in parts]
    assert sorted(sum(labels, [])) == sorted(str(x.label) for x in inputs)
    assert all(len(p) > 5 for p in parts)  # 41 inputs spread over 3 shards
    moved = [ImageInput(Path("/elsewhere") / x.label, x.label) for x in reversed(inputs)]
    assert sorted(str(x.label) for x in Shard(1, 3).select(moved)) == labels[1]
    for bad in ("3/3", "1", "a/b", "0/0", "-1/2"):
        with pytest.raises(CXRError, match="--shard"):
            Shard.parse(bad)


def test_shard_option_and_manifest_input(tiny_run: Path, scans: Path, tmp_path: Path,
                                         reference: dict[str, dict]) -> None:
    manifest = tmp_path / "list.csv"
    rels = sorted(str(p.relative_to(scans)) for p in scans.rglob("*.png"))
    manifest.write_text("image,site\n" + "".join(f"{r},x\n" for r in rels))
    (tmp_path / "a").symlink_to(scans / "a")
    (tmp_path / "b").symlink_to(scans / "b")
    rows = []
    for i in range(2):
        out = tmp_path / f"shard{i}.jsonl"
        res = _predict(str(manifest), "--model", str(tiny_run), "--out", str(out), "--shard", f"{i}/2",
                       "--workers", "0")
        assert res.exit_code in (0, 1), res.output
        rows += read_results(out)
    got = {str(Path(r["path"]).relative_to(tmp_path)): r for r in rows}
    ref = {str(Path(p).relative_to(scans)): r for p, r in reference.items()}
    assert set(got) == set(ref) and len(rows) == len(ref)
    for k in got:
        got[k]["path"] = ref[k]["path"]
    _same({r["path"]: r for r in got.values()}, reference)
    res = _predict(str(scans), "--model", str(tiny_run), "--shard", "0/2")
    assert res.exit_code == 2 and "--out" in res.stderr
