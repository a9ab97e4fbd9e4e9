"""The one error type the project raises for bad input."""

from __future__ import annotations

from pathlib import Path


class CXRError(Exception):
    """Bad input or an unusable file: the message names the file (if any) and the problem."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
