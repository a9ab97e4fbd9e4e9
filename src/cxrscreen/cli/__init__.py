"""The `cxrscreen` command line: thin modules, one per command group, that parse, call the library and print.

Importing this package registers every command on ``app`` (``cxrscreen.cli.app``).
"""

from __future__ import annotations

from cxrscreen.cli import (  # noqa: F401  (register the commands)
    audit,
    calibrate,
    compare,
    data,
    evaluate,
    export,
    head,
    localize,
    models,
    pacs,
    predict,
    segment,
    severity,
    train,
)
from cxrscreen.cli.app import app


def main() -> None:
    """Entry point of the `cxrscreen` script."""
    app()


__all__ = ["app", "main"]
