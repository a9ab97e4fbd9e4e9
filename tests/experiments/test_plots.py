"""The comparison's plots: an early spike does not flatten the loss curves."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from cxrscreen.experiments.plots import _clip_axis


def test_a_spike_cuts_the_axis_and_says_so() -> None:
    ax = Figure().add_subplot()
    spiky = pd.Series([80.0] + [1.0 - 0.02 * i for i in range(30)])
    note = _clip_axis(ax, [spiky, pd.Series([1.1, 0.9, 0.8, 0.7])])
    assert note.startswith(" (axis cut at ") and note.endswith(": 1 point above)")
    assert ax.get_ylim()[1] < 2.0


def test_curves_without_outliers_are_not_cut() -> None:
    ax = Figure().add_subplot()
    before = ax.get_ylim()
    assert _clip_axis(ax, [pd.Series([1.2, 1.0, 0.9, 0.85, 0.8]), pd.Series([], dtype=float)]) == ""
    assert ax.get_ylim() == before
