"""The one decision rule: class probabilities -> the class a user sees.

Every figure (evaluate's accuracy, macro-F1, confusion matrix, COVID sensitivity / specificity; the audit)
and every output (predict's text / JSON / CSV, the web page, the heatmap title) goes through `decide`, so
the class printed is the class the figures count. Two rules exist:

- ``argmax``: the most probable class;
- ``operating_point``: COVID when p(covid) >= threshold, else the most probable of the other classes
  (a threshold chosen on validation data for a target sensitivity, see `calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError


@dataclass(frozen=True)
class DecisionRule:
    """How probabilities become a class. `threshold` is None for arg-max."""

    threshold: float | None = None
    positive: str = "covid"

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise CXRError(f"a decision threshold is a probability in [0, 1], got {self.threshold}")

    @property
    def rule(self) -> str:
        return "argmax" if self.threshold is None else "operating_point"

    def to_dict(self) -> dict[str, Any]:
        """What outputs carry in their `decision` field."""
        if self.threshold is None:
            return {"rule": "argmax"}
        return {"rule": "operating_point", "class": self.positive, "threshold": self.threshold}

    def describe(self) -> str:
        """One line for people: which rule chose the class."""
        if self.threshold is None:
            return "the most probable class (arg-max)"
        return (f"{self.positive} when p({self.positive}) >= {self.threshold:.3f}, "
                f"else the most probable other class")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DecisionRule:
        if not d or d.get("rule") == "argmax":
            return cls()
        return cls(threshold=float(d["threshold"]), positive=str(d.get("class", "covid")))


def decide(probs: np.ndarray, classes: Sequence[str], rule: DecisionRule) -> np.ndarray:
    """Class indices (N,) of probabilities (N, C) under `rule` (a (C,) row gives a 0-d array)."""
    p = np.asarray(probs, dtype=float)
    if rule.threshold is None:
        return p.argmax(-1)
    if rule.positive not in classes:
        raise CXRError(f"the decision rule's class {rule.positive!r} is not one of {', '.join(classes)}")
    k = list(classes).index(rule.positive)
    others = p.copy()
    others[..., k] = -np.inf
    return np.where(p[..., k] >= rule.threshold, k, others.argmax(-1))


def decide_names(probs: np.ndarray, classes: Sequence[str], rule: DecisionRule) -> list[str]:
    """Class names of `decide` for a batch (N, C)."""
    return [classes[int(i)] for i in np.atleast_1d(decide(probs, classes, rule))]

