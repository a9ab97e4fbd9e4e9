"""Test helpers for processes: kill a process tree (a killed job in the kill-and-resume tests), run Python code in
a fresh interpreter on this checkout's sources (what a fresh `cxrscreen` process imports)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


SRC = Path(__file__).resolve().parents[1] / "src"


def run_fresh_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` with `python -c` in a new interpreter whose PYTHONPATH starts with this checkout's src; its
    stdout and stderr captured as text."""
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
