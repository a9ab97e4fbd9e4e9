"""The comparison's plots (matplotlib object API on an Agg canvas; pyplot's global state untouched): training
curves of every run and of one run, ROC of COVID vs rest with the study's operating point, confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure  # object API: Agg canvas, pyplot's backend untouched

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def run_styles(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Colour per architecture, size and initial weights (ImageNet or scratch), solid line for CLAHE on,
    dashed for off."""
    from matplotlib import colormaps

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["arch"], r["image_size"], r.get("weights") or "none"

    keys = list(dict.fromkeys(key(r) for r in runs))
    cmap = colormaps["tab10" if len(keys) <= 10 else "tab20"]
    return {r["name"]: {"color": cmap(keys.index(key(r)) % cmap.N), "linestyle": "-" if r["clahe"] else "--"}
            for r in runs}


def _epoch_axis(ax: Any, last_epoch: float) -> None:
    from matplotlib.ticker import MaxNLocator

    last = int(last_epoch) if last_epoch == last_epoch and last_epoch >= 1 else 1  # NaN-safe
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, last + 0.5)
    if last <= 20:
        ax.set_xticks(range(1, last + 1))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _clip_axis(ax: Any, series: list[pd.Series]) -> str:
    """Cut the y axis above 1.2 x the 95th percentile of all values when a few outliers (an early epoch's
    spike) would flatten every curve; returns the title note that says so ("" when nothing is cut)."""
    values = np.concatenate([s.dropna().to_numpy(float) for s in series]) if series else np.array([])
    if not len(values):
        return ""
    top = 1.2 * float(np.quantile(values, 0.95))
    n_above = int(np.sum(values > top))
    if not n_above or values.max() < 1.5 * top:
        return ""
    ax.set_ylim(0, top)
    return f" (axis cut at {top:.2f}: {n_above} point{'s' if n_above > 1 else ''} above)"


def plot_curves_all(histories: dict[str, pd.DataFrame], styles: dict[str, dict[str, Any]], path: Path) -> Path:
    """Train loss and val loss per epoch of every run, two panels of one figure."""
    fig, (ax_t, ax_v) = _figure(13.0, 5.0, 2)
    for name, h in histories.items():
        for ax, col in ((ax_t, "train_loss"), (ax_v, "val_loss")):
            if col in h and h[col].notna().any():
                ax.plot(h["epoch"], h[col], marker="o", ms=3, label=name, **styles.get(name, {}))
    last = max((float(h["epoch"].max()) for h in histories.values() if "epoch" in h), default=1.0)
    for ax, col, title in ((ax_t, "train_loss", "train loss"), (ax_v, "val_loss", "val loss")):
        _epoch_axis(ax, last)
        ax.set_ylabel("cross-entropy")
        ax.set_title(title + _clip_axis(ax, [h[col] for h in histories.values() if col in h]))
        ax.grid(alpha=0.3)
    handles, labels = ax_t.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle("Training curves (solid: CLAHE on, dashed: CLAHE off)")
    fig.savefig(path, dpi=100)
    return path


def plot_run_curves(name: str, h: pd.DataFrame, path: Path) -> Path:
    """One run: train / val loss, and val accuracy / macro-F1 per epoch."""
    fig, (ax_l, ax_m) = _figure(9.0, 3.6, 2)
    for col, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        if col in h and h[col].notna().any():
            ax_l.plot(h["epoch"], h[col], marker="o", ms=3, label=label)
    for col, label in (("val_accuracy", "val accuracy"), ("val_macro_f1", "val macro-F1"),
                       ("val_covid_sensitivity", "val COVID sensitivity")):
        if col in h and h[col].notna().any():
            ax_m.plot(h["epoch"], h[col], marker="o", ms=3, label=label)
    ax_l.set_ylabel("cross-entropy")
    note = _clip_axis(ax_l, [h[c] for c in ("train_loss", "val_loss") if c in h])
    if note:
        ax_l.set_title(note.strip(" ()"), fontsize=8)
    ax_m.set_ylim(0, 1.05)
    for ax in (ax_l, ax_m):
        _epoch_axis(ax, float(h["epoch"].max()) if "epoch" in h else 1.0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(name, fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def plot_roc(probs: dict[str, pd.DataFrame], aucs: dict[str, float | None], styles: dict[str, dict[str, Any]],
             reference: dict[str, Any], path: Path) -> Path:
    """ROC curves of COVID vs rest on the test subset, with the study's reported operating point."""
    from sklearn.metrics import roc_curve

    fig, (ax,) = _figure(11.0, 6.5)
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
    for name, df in probs.items():
        y = (df["label"] == "covid").to_numpy()
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, df["p_covid"].to_numpy(float))
        auc = aucs.get(name)
        ax.plot(fpr, tpr, lw=1.4, label=f"{name} (AUC {auc:.3f})" if auc is not None else name,
                **styles.get(name, {}))
    ax.plot([1 - reference["covid_specificity"]], [reference["covid_sensitivity"]], "k*", ms=12,
            label=f"{reference['arch']}: {reference['source']} (its own test set)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity")
    ax.set_title("COVID vs rest on the test subset")
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    fig.savefig(path, dpi=100)
    return path


def plot_confusion(name: str, cm: list[list[int]], class_names: list[str], path: Path) -> Path:
    """Confusion matrix: counts and row percentages (rows: true class)."""
    fig, (ax,) = _figure(4.4, 3.9)
    a = np.asarray(cm, dtype=float)
    rows = a / np.maximum(a.sum(1, keepdims=True), 1)
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(j, i, f"{int(a[i, j])}\n{100 * rows[i, j]:.0f}%", ha="center", va="center", fontsize=9,
                    color="white" if rows[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(name, fontsize=9)
    fig.savefig(path, dpi=100)
    return path
