"""Feedback on stderr: a progress bar for multi-image runs on a terminal only; nothing extra when piped."""

from __future__ import annotations

import io

from rich.console import Console

from cxrscreen.cli import predict as predict_cli


def test_progress_bar_only_for_several_images_on_a_terminal(monkeypatch) -> None:
    tty = Console(file=io.StringIO(), force_terminal=True, width=100)
    monkeypatch.setattr(predict_cli, "console", tty)
    assert predict_cli._progress(1) is None
    bar = predict_cli._progress(3)
    assert bar is not None
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "predicting" in tty.file.getvalue()
    assert bar.done == 3


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(predict_cli, "console", Console(file=io.StringIO(), force_terminal=False))
    assert predict_cli._progress(50) is None
