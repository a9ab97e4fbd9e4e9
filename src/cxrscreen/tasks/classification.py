"""classification: moved from cxrscreen.engine."""

from __future__ import annotations

import numpy as np
import torch

from cxrscreen.evaluation.metrics import binary_rates


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (absent classes get weight 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.tensor(w / w[w > 0].mean(), dtype=torch.float32)


def val_figures(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    """Validation accuracy, macro-F1 and COVID sensitivity / specificity of arg-max predictions."""
    from sklearn.metrics import f1_score

    pred = probs.argmax(1)
    covid = classes.index("covid")
    sens, spec = binary_rates(labels == covid, pred == covid)
    return {
        "val_accuracy": float((pred == labels).mean()),
        "val_macro_f1": float(f1_score(labels, pred, labels=list(range(len(classes))), average="macro",
                                       zero_division=0)),
        "val_covid_sensitivity": sens,
        "val_covid_specificity": spec,
    }


def per_source_val(
    probs: np.ndarray, labels: np.ndarray, sources: list[str], weight: torch.Tensor | None
) -> dict[str, float]:
    """The worst source on validation: the highest mean cross-entropy and the lowest arg-max accuracy
    over the sources of the val images (what a checkpoint is chosen by when generalisation matters)."""
    src = np.asarray(sources)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))
    if weight is not None:
        nll = nll * weight.numpy()[labels]
    pred = probs.argmax(1)
    groups = [src == s for s in sorted(set(sources))]
    return {
        "val_worst_source_loss": float(max(nll[m].mean() for m in groups)),
        "val_worst_source_accuracy": float(min((pred[m] == labels[m]).mean() for m in groups)),
    }

