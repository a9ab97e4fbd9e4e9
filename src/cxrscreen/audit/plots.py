"""The audit's figures: masking, source probe and leave-one-source-out plots, and masked examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.audit.masking import BOX_SUBSETS, CONDITIONS, MaskingSet


# ------------------------------------------------------------------------------------------------- plots
def _figure(width: float = 6.5, height: float = 3.8) -> Any:
    from matplotlib.figure import Figure  # object API: Agg canvas, no pyplot state

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def plot_masking(masking: dict[str, Any], path: Path) -> Path:
    """Bars: accuracy on original / lungs-masked / lungs-only per box kind, with chance."""
    fig, ax = _figure()
    names = [s for s in BOX_SUBSETS if masking["subsets"][s].get("n")]
    x = np.arange(len(names))
    for i, c in enumerate(CONDITIONS):
        vals = [masking["subsets"][s][c]["accuracy"] for s in names]
        ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=c.replace("_", "-"))
    for j, s in enumerate(names):
        ax.hlines(
            masking["subsets"][s]["chance"],
            j - 0.42,
            j + 0.42,
            colors="k",
            linestyles="--",
            label="chance (majority class)" if j == 0 else None,
        )
    ax.set_xticks(x, [f"{s} boxes\n(n={masking['subsets'][s]['n']})" for s in names])
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy with lungs masked / only lungs shown")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.savefig(path, dpi=110)
    return path


def plot_loso(loso: dict[str, Any], path: Path) -> Path:
    """Bars per source: held-out accuracy (LOSO model) vs the audited model on the internal test split."""
    fig, ax = _figure()
    names = list(loso["sources"])
    x = np.arange(len(names))
    internal = [loso["sources"][s].get("internal", {}).get("accuracy") or 0.0 for s in names]
    held = [loso["sources"][s]["held_out"]["accuracy"] or 0.0 for s in names]
    ax.bar(x - 0.2, internal, 0.4, label="internal test (audited model)")
    ax.bar(x + 0.2, held, 0.4, label="held-out source (LOSO model)")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("accuracy")
    ax.set_title("Leave-one-source-out")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.savefig(path, dpi=110)
    return path


def plot_probe(probe: dict[str, Any], path: Path) -> Path:
    """Bars: source-probe accuracy, label-only baseline, chance."""
    fig, ax = _figure(5.0, 3.5)
    vals = [probe["accuracy"], probe["label_only_accuracy"], probe["chance"]]
    ax.bar(["source probe", "label only", "chance"], vals, color=["C3", "C1", "0.6"])
    for i, v in enumerate(vals):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy at naming the source")
    ax.set_title(f"Source probe ({len(probe['sources'])} sources)")
    fig.savefig(path, dpi=110)
    return path


def plot_masking_examples(ms: MaskingSet, path: Path, k: int = 4) -> Path:
    """A few test images under each condition, annotated-box images first."""
    from matplotlib.figure import Figure

    order = sorted(range(len(ms.kinds)), key=lambda i: ms.kinds[i] != "annotated")[:k]
    fig = Figure(figsize=(2.0 * len(CONDITIONS), 2.0 * max(len(order), 1)), layout="constrained")
    for r, i in enumerate(order):
        for c, cond in enumerate(CONDITIONS):
            ax = fig.add_subplot(len(order), len(CONDITIONS), r * len(CONDITIONS) + c + 1)
            ax.imshow(ms.image(i, cond), cmap="gray", vmin=0, vmax=255)
            ax.set_axis_off()
            ax.set_title(f"{cond} ({ms.kinds[i]} boxes)" if c == 0 else f"{cond} ({ms.lung_source})",
                         fontsize=7)
    fig.savefig(path, dpi=110)
    return path

