"""Output piped to a file or another program is never cut to 80 columns (names, help summaries)."""

from __future__ import annotations

import subprocess
import sys

from cxrscreen.models.registry import available_models


def _run(*args: str) -> str:
    """Run the CLI in a fresh process with stdout on a pipe (not a terminal); return stdout."""
    proc = subprocess.run([sys.executable, "-m", "cxrscreen.cli", *args], capture_output=True, text=True,
                          timeout=120, env={"COLUMNS": "", "PATH": "/usr/bin:/bin"} | _pythonpath())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _pythonpath() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "VIRTUAL_ENV")}


def test_models_lists_every_name_whole_when_piped() -> None:
    shown = _run("models")
    for name in available_models():
        assert name in shown, f"{name} cut in piped `cxrscreen models` output"


def test_help_summaries_not_cut_when_piped() -> None:
    shown = _run("--help")
    commands = [line for line in shown.splitlines() if line.startswith("  ") and line.strip()]
    assert commands, shown
    assert not [line for line in commands if line.rstrip().endswith("...")], shown
