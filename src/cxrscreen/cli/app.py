"""The `cxrscreen` command line: thin wrappers that parse, call the library, and print."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from cxrscreen.errors import CXRError

# Piped or redirected output has no terminal width: click and rich would assume 80 columns and cut table cells
# ("tf_efficientnet_l…"), CIs and --help summaries ("..."). Off a terminal they get a width nothing reaches.
PIPED_WIDTH = 1000
_width: int | None = None if sys.stdout.isatty() else PIPED_WIDTH
_context = {"terminal_width": _width, "max_content_width": _width} if _width else {}

# rich_markup_mode=None: plain click help (no "<bool>" after flags, no markup read in help texts)
app = typer.Typer(help="Screen chest X-rays for COVID-19 and other pneumonia.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None,
                  context_settings=_context)
data_app = typer.Typer(help="Build dataset manifests and splits.", no_args_is_help=True, rich_markup_mode=None,
                       context_settings=_context)
app.add_typer(data_app, name="data")
# stderr for messages, stdout for results; soft_wrap: a long line is never broken at 80 columns when piped
console = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False, width=_width)


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


def _Bar(desc: str, total: int) -> Any:  # noqa: N802  (the progress_factory the library calls)
    """A transient progress bar on stderr with the update(n) / close() interface the library expects."""
    from cxrscreen.cli.progress import RichProgress

    return RichProgress(console, total, desc=desc, log_every_s=None, transient=True)


def _fail(exc: CXRError) -> None:
    console.print(f"error: {_shown(exc)}", markup=False)
    raise typer.Exit(2)


localize_app = typer.Typer(help="The lung localizer that labels lung boxes for the SSD detector.", no_args_is_help=True)
app.add_typer(localize_app, name="localize")
