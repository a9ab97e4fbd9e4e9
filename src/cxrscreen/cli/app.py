"""The `cxrscreen` command line: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cxrscreen.errors import CXRError

# rich_markup_mode=None: plain click help (no "<bool>" after flags, no markup read in help texts)
app = typer.Typer(help="Screen chest X-rays for COVID-19 and other pneumonia.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)
data_app = typer.Typer(help="Build dataset manifests and splits.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")
# stderr for messages, stdout for results; soft_wrap: a long line is never broken at 80 columns when piped
console = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False)


def _shown(text: object) -> str:
    """A path or file name as printed: control characters as escapes (\\n, \\x1b); print it with
    markup=False, or through rich.markup.escape, so that '[red]' stays literal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _log(msg: object) -> None:
    """Progress messages from the library: printed literally (they hold paths), on stderr."""
    console.print(str(msg), markup=False)


def _version(value: bool) -> None:
    if value:
        from cxrscreen import __version__

        print(f"cxrscreen {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Screen chest X-rays for COVID-19 and other pneumonia (research use only: not a medical device)."""


class _Bar:
    """A rich progress bar with the update(n) / close() interface the library expects."""

    def __init__(self, desc: str, total: int) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.progress.start()
        self.task = self.progress.add_task(desc, total=total)

    def update(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def close(self) -> None:
        self.progress.stop()


def _fail(exc: CXRError) -> None:
    console.print(f"error: {_shown(exc)}", markup=False)
    raise typer.Exit(2)


localize_app = typer.Typer(help="The lung localizer that labels lung boxes for the SSD detector.", no_args_is_help=True)
app.add_typer(localize_app, name="localize")
