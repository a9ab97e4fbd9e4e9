"""Batch screening against a hostile user (issue 21): two writers on one output file, and killed runs that
left their decode workers behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cxrscreen.errors import CXRError
from cxrscreen.predict.batch import ResultWriter, read_results
from tests.conftest import synthetic_cxr

CLASSES = ["covid", "normal", "pneumonia"]
REPO = Path(__file__).resolve().parents[2]


def _row(path: str) -> dict:
    return {"path": path, "class": "normal", "probabilities": {"covid": 0.1, "normal": 0.8, "pneumonia": 0.1},
            "flags": [], "error": None}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_second_writer_on_a_running_output_is_refused(tmp_path: Path, suffix: str) -> None:
    """A second `--resume` run rewrote the file under the first: 239 screened, 192 rows kept."""
    out = tmp_path / f"r{suffix}"
    first = ResultWriter(out, CLASSES)
    first.write([_row("a.png")])
    with pytest.raises(CXRError) as info:
        ResultWriter(out, CLASSES, resume=True)
    assert "locked" in str(info.value) and str(out) in str(info.value)
    first.write([_row("b.png")])
    first.close()
    assert [r["path"] for r in read_results(out)] == ["a.png", "b.png"]
    again = ResultWriter(out, CLASSES, resume=True)  # the lock went with the first writer
    assert again.done == {"a.png", "b.png"}
    again.close()


def test_resume_cuts_a_torn_row_in_place(tmp_path: Path) -> None:
    """The torn last row is dropped in the same file (no replacement under a process that holds it open)."""
    out = tmp_path / "r.jsonl"
    w = ResultWriter(out, CLASSES)
    w.write([_row("a.png")])
    w.close()
    with open(out, "a") as f:
        f.write('{"path": "b.pn')
    inode = out.stat().st_ino
    again = ResultWriter(out, CLASSES, resume=True)
    again.close()
    assert out.stat().st_ino == inode and [r["path"] for r in read_results(out)] == ["a.png"]


# ------------------------------------------------------------------------------------ killed runs


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_batch(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """`predict FOLDER --out k.csv --workers 1` in a child process, once its decode worker runs:
    (the process, its worker processes)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(60):
        cv2.imwrite(str(folder / f"{i:03d}.png"), (synthetic_cxr(300, 280, seed=i) * 255).astype(np.uint8))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", "from cxrscreen.cli import app; app()", "predict", str(folder),
                             "--out", str(tmp_path / "k.csv"), "--workers", "1", "--batch-size", "1",
                             "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = [c for c in _children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ")]
        out = tmp_path / "k.csv"
        if workers and out.exists() and len(out.read_text().splitlines()) >= 3:  # rows written: decoding runs
            return proc, _children(proc.pid)
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("no decode worker appeared")


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_a_killed_batch_run(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGKILL or SIGTERM of `predict --out` left the spawned decode worker (~750 MB) and the resource
    tracker alive under PID 1; now the worker dies with its parent (PR_SET_PDEATHSIG) and SIGTERM ends the
    run cleanly (exit 143, the output's rows complete)."""
    proc, children = _start_batch(tmp_path)
    try:
        os.kill(proc.pid, sig)
        proc.wait(30)
        left = _gone_within(children, 3)  # at once: torch's own watchdog takes 5 s or more, and none while
        # the worker decodes (a big image) or blocks
        assert not left, f"still running after the parent was killed: {left}"
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read().decode()[-2000:]
            rows = read_results(tmp_path / "k.csv")  # every written row complete
            assert rows and all(r["class"] or r["error"] or r["flags"] for r in rows)
    finally:
        for p in [proc.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
