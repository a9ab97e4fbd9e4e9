"""Progress on the command line: a bar with images/s and the ETA on a terminal, log lines in a batch job's log."""

from __future__ import annotations

import time
from typing import Any


class RichProgress:
    """A progress bar on `console` (stderr) with images/s and the ETA; `update(n)` / `close()`.

    When the console is no terminal (a batch job's log) it prints a line every `log_every_s` seconds instead
    (None: no lines). `transient`: the bar disappears when closed (the CLI's loading and epoch bars).
    """

    def __init__(self, console: Any, total: int, *, desc: str = "screening", log_every_s: float | None = 30.0,
                 transient: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console, self.total, self.log_every_s = console, total, log_every_s
        self.done, self.t0, self.last_log = 0, time.monotonic(), time.monotonic()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]} img/s"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=transient,
                                 disable=not console.is_terminal)
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total, rate="-")

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        rate = self.done / max(now - self.t0, 1e-9)
        self.progress.update(self.task, advance=n, rate=f"{rate:.1f}")
        if self.log_every_s is not None and not self.console.is_terminal and now - self.last_log >= self.log_every_s:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.console.print(f"{self.done}/{self.total} images, {rate:.1f} img/s, ETA {eta:.0f} s", markup=False)
            self.last_log = now

    def close(self) -> None:
        self.progress.stop()
