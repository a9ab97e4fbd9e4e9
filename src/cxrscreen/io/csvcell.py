"""One rule for every text cell a CSV writer emits: no raw control characters, no formula.

Spreadsheets run a cell that starts with ``= + - @`` (or a tab / carriage return before one) as a formula
(CSV injection, OWASP). :func:`safe_cell` writes control characters as escapes (``\\n``, ``\\x1b``, the way
the command line prints paths) and prefixes a formula-looking cell with ``'`` so that it stays text.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def escape_controls(text: str) -> str:
    """``text`` with every non-printable character written as its Python escape (``\\n``, ``\\x1b``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def safe_cell(value: object) -> str:
    """A CSV text cell: control characters escaped, a leading ``= + - @`` neutralised with ``'``.

    Numbers are left alone (``-0.5`` stays a number); ``None`` becomes the empty cell.
    """
    if value is None:
        return ""
    if isinstance(value, int | float):  # bool is an int
        return str(value)
    text = str(value)
    if text.startswith(FORMULA_STARTS):
        text = "'" + text
    return escape_controls(text)
