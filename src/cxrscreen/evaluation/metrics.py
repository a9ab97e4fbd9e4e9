"""Classification metrics, patient-grouped bootstrap confidence intervals, and calibration error.

All functions take integer labels `y` (N,), class probabilities `p` (N, C) and, for the bootstrap,
a group id per image (the manifest's `split_group`): resampling groups rather than images keeps the
images of one patient together, so the intervals are not too narrow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score
from torchvision.ops import box_iou

from cxrscreen.runs.decision import DecisionRule, decide

if TYPE_CHECKING:
    from cxrscreen.models.detectors import Detections


def safe_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present."""
    if len(np.unique(y_true)) < 2:
        return None
    return float(roc_auc_score(y_true, score))


def binary_rates(y_pos: np.ndarray, pred_pos: np.ndarray) -> tuple[float | None, float | None]:
    """(sensitivity, specificity) of boolean predictions; None where the denominator is empty."""
    y_pos = np.asarray(y_pos, bool)
    pred_pos = np.asarray(pred_pos, bool)
    n_pos, n_neg = int(y_pos.sum()), int((~y_pos).sum())
    sens = float((pred_pos & y_pos).sum() / n_pos) if n_pos else None
    spec = float((~pred_pos & ~y_pos).sum() / n_neg) if n_neg else None
    return sens, spec


def grouped_bootstrap_ci(
    stat: Callable[[np.ndarray], float | None],
    groups: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float] | None:
    """Percentile CI of `stat(indices)` over bootstrap resamples of whole groups.

    stat receives an index array into the original samples and returns a number (or None to skip a
    resample where the statistic is undefined). Returns None if no resample gave a value.
    """
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[g] for g in pick])
        v = stat(idx)
        if v is not None:
            values.append(v)
    if not values:
        return None
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _with_ci(value: float | None, ci: tuple[float, float] | None) -> dict[str, Any]:
    return {"value": value, "ci95": None if ci is None else [ci[0], ci[1]]}


def covid_vs_rest(
    y: np.ndarray,
    p: np.ndarray,
    groups: Sequence[str],
    *,
    positive: int = 0,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Sensitivity, specificity and AUC of one class against the rest, each with a grouped 95 % CI.

    A case is called positive when `decision.decide` calls it `positive`: its probability is >= threshold,
    or, with no threshold, `positive` is the arg-max class.
    """
    y = np.asarray(y)
    p = np.asarray(p)
    score = p[:, positive]
    names = [str(k) for k in range(p.shape[1])]
    pred = decide(p, names, DecisionRule(threshold=threshold, positive=names[positive])) == positive
    y_pos = y == positive

    def sens(i: np.ndarray) -> float | None:
        return binary_rates(y_pos[i], pred[i])[0]

    def spec(i: np.ndarray) -> float | None:
        return binary_rates(y_pos[i], pred[i])[1]

    def auc(i: np.ndarray) -> float | None:
        return safe_auc(y_pos[i], score[i])

    idx = np.arange(len(y))
    out = {}
    for name, f in (("sensitivity", sens), ("specificity", spec), ("auc", auc)):
        out[name] = _with_ci(f(idx), grouped_bootstrap_ci(f, groups, n_boot=n_boot, seed=seed))
    out["threshold"] = threshold
    out["n_positive"] = int(y_pos.sum())
    out["n_negative"] = int((~y_pos).sum())
    return out


def classification_report(
    y: np.ndarray,
    p: np.ndarray,
    groups: Sequence[str],
    classes: Sequence[str],
    *,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The evaluation JSON body: n, accuracy, macro_f1, per-class figures, confusion matrix, covid_vs_rest,
    and `decision`: every figure counts the classes `decision.decide` gives under threshold (None: arg-max)."""
    y = np.asarray(y)
    p = np.asarray(p)
    labels = list(range(len(classes)))
    rule = DecisionRule(threshold=threshold)
    pred = decide(p, classes, rule) if len(y) else np.zeros(0, dtype=int)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = {
        c: {
            "precision": float(prec[k]),
            "recall": float(rec[k]),
            "f1": float(f1[k]),
            "auc": safe_auc(y == k, p[:, k]),
            "support": int(support[k]),
        }
        for k, c in enumerate(classes)
    }
    return {
        "n": int(len(y)),
        "decision": rule.to_dict(),
        "accuracy": float((pred == y).mean()) if len(y) else None,
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "classes": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "confusion_matrix_axes": "rows: true class, columns: predicted class, in the order of `class_names`",
        "class_names": list(classes),
        "covid_vs_rest": covid_vs_rest(
            y, p, groups, positive=list(classes).index("covid"), threshold=threshold, n_boot=n_boot, seed=seed
        ),
    }


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    """Per confidence bin: lower/upper edge, mean confidence, accuracy, count (for a reliability diagram)."""
    y = np.asarray(y)
    p = np.asarray(p)
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            rows.append(
                {"lo": float(lo), "hi": float(hi), "confidence": float(conf[m].mean()),
                 "accuracy": float(correct[m].mean()), "count": int(m.sum())}
            )
    return rows


def ece_from_bins(bins: Sequence[dict[str, float]]) -> float:
    """Top-label ECE from `reliability_bins` rows: count-weighted mean |accuracy - confidence|."""
    total = sum(b["count"] for b in bins)
    if total == 0:
        return 0.0
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE over equal-width confidence bins (the ECE of `reliability_bins`)."""
    return ece_from_bins(reliability_bins(y, p, n_bins))


# ---------------------------------------------------------------------------------------------- metrics
def average_precision(
    preds: Sequence[Detections], truths: Sequence[tuple[np.ndarray, np.ndarray]], label: int, iou: float = 0.5
) -> float | None:
    """All-point interpolated AP of one label (PASCAL VOC 2010+ / COCO style at one IoU).

    preds[i]: detections of image i; truths[i]: (boxes (K, 4), labels (K,)) in the same pixels.
    A detection matches the best-overlapping unmatched true box of its label at IoU >= iou.
    Returns None when no true box has this label.
    """
    n_true = sum(int((np.asarray(t[1]) == label).sum()) for t in truths)
    if n_true == 0:
        return None
    scored: list[tuple[float, int, np.ndarray]] = []
    for i, d in enumerate(preds):
        m = d["labels"] == label
        scored.extend((float(s), i, b) for s, b in zip(d["scores"][m], d["boxes"][m], strict=True))
    scored.sort(key=lambda x: -x[0])
    used = [np.zeros(int((np.asarray(t[1]) == label).sum()), bool) for t in truths]
    gt = [torch.as_tensor(np.asarray(t[0], np.float32).reshape(-1, 4)[np.asarray(t[1]) == label]) for t in truths]
    tp = np.zeros(len(scored))
    for k, (_, i, b) in enumerate(scored):
        if len(gt[i]) == 0:
            continue
        ious = box_iou(torch.as_tensor(b, dtype=torch.float32).view(1, 4), gt[i])[0].numpy()
        ious[used[i]] = -1.0
        j = int(ious.argmax())
        if ious[j] >= iou:
            used[i][j] = True
            tp[k] = 1
    ctp = np.cumsum(tp)
    recall = np.concatenate([[0.0], ctp / n_true])
    precision = np.concatenate([[1.0], ctp / np.arange(1, len(scored) + 1)])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum((recall[1:] - recall[:-1]) * precision[1:]))


def mean_average_precision(
    preds: Sequence[Detections], truths: Sequence[tuple[np.ndarray, np.ndarray]], labels: Sequence[int],
    iou: float = 0.5,
) -> float | None:
    """Mean over labels (those with true boxes) of ``average_precision``; None if none has any."""
    aps = [a for a in (average_precision(preds, truths, lb, iou) for lb in labels) if a is not None]
    return float(np.mean(aps)) if aps else None

