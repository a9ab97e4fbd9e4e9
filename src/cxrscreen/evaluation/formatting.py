"""formatting: figures and their 95 % intervals as text, for the CLI tables and the Markdown / HTML reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def format_value(v: Any, digits: int = 3, *, missing: str = "n/a", signed: bool = False) -> str:
    """A number to ``digits`` decimals ("+" sign with ``signed``); ``missing`` for None or NaN.

    ``v`` may be an eval-JSON figure ``{"value": ..., "ci95": ...}`` (its value is shown).
    """
    if isinstance(v, dict):
        v = v.get("value")
    if _missing(v):
        return missing
    return f"{v:{'+' if signed else ''}.{digits}f}"


def format_ci(value: Any, ci: Sequence[float | None] | None = None, digits: int = 3, *, missing: str = "n/a",
              signed: bool = False) -> str:
    """'0.950 [0.920, 0.970]': a value and its interval (the interval left out when it is None / empty or
    either end is None); ``missing`` when the value is None or NaN.

    ``value`` may be an eval-JSON figure ``{"value": ..., "ci95": [lo, hi]}`` (``ci`` then defaults to its ci95).
    """
    if isinstance(value, dict):
        ci = value.get("ci95") if ci is None else ci
        value = value.get("value")
    if _missing(value):
        return missing
    text = format_value(value, digits, signed=signed)
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{format_value(ci[0], digits, signed=signed)}, {format_value(ci[1], digits, signed=signed)}]"
    return text
