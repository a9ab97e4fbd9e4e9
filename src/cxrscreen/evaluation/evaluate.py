"""Run-level evaluation: a model on a manifest (optionally one subset of a split) -> eval JSON.

The JSON holds n, accuracy, macro_f1, per-class precision / recall / F1 / AUC, the confusion
matrix, covid_vs_rest sensitivity / specificity / AUC with 95 % CIs from a bootstrap that resamples
patients (split_group), and the same figures per source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.data.manifest import manifest_hash
from cxrscreen.data.subsets import SubsetData, load_subset
from cxrscreen.evaluation.metrics import classification_report
from cxrscreen.io.files import file_sha256
from cxrscreen.runs.provenance import provenance
from cxrscreen.runs.run_dir import LoadedRun
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir


def run_probabilities(
    run: LoadedRun, images: np.ndarray, *, batch_size: int = 64, calibrated: bool = True
) -> np.ndarray:
    """Class probabilities (N, C) of preprocessed uint8 images (N, S, S) by the run's task: a classifier's
    softmax with its fitted temperature (when `calibrated`), a detector's image rule."""
    return run.task.outputs(run, images, batch_size=batch_size, calibrated=calibrated)[0]


def report_for(
    data: SubsetData, probs: np.ndarray, classes: list[str], *, threshold: float | None, n_boot: int, seed: int
) -> dict[str, Any]:
    """classification_report overall plus `per_source`."""
    out = classification_report(data.labels, probs, data.groups, classes, threshold=threshold,
                                n_boot=n_boot, seed=seed)
    sources = np.asarray(data.sources)
    out["per_source"] = {
        s: classification_report(data.labels[sources == s], probs[sources == s],
                                 [g for g, m in zip(data.groups, sources == s, strict=True) if m],
                                 classes, threshold=threshold, n_boot=n_boot, seed=seed)
        for s in sorted(set(data.sources))
    }
    return out


def evaluate_subset(
    run: LoadedRun,
    data_dir: Path,
    *,
    split_csv: Path | None = None,
    subset: str = "test",
    n_boot: int = 1000,
    seed: int = 0,
    use_operating_point: bool = True,
    threshold: float | None = None,
    cache_dir: Path | None = None,
    progress: Any = None,
) -> tuple[dict[str, Any], SubsetData, np.ndarray]:
    """The eval JSON of `evaluate_run`, plus the images and probabilities it came from (one model pass).

    The classes are decided by `run.decision_rule` (the stored operating point; arg-max when
    use_operating_point is False; `threshold` when given), the rule `predict` applies by default.
    """
    cache = PreprocessedCache(run.preprocess, cache_dir if cache_dir is not None else default_cache_dir())
    data = load_subset(Path(data_dir), split_csv, subset if split_csv else None, cache, run.classes, progress)
    probs = run_probabilities(run, data.images)
    threshold = run.decision_rule(argmax=not use_operating_point, threshold=threshold).threshold
    out: dict[str, Any] = report_for(data, probs, run.classes, threshold=threshold, n_boot=n_boot, seed=seed)
    out["meta"] = {
        "model": str(run.run_dir),
        "arch": run.arch,
        "weights_sha256": run.config.get("weights_sha256"),
        "data": str(data_dir),
        "manifest_sha256": manifest_hash(data_dir),
        "split": None if split_csv is None else str(split_csv),
        "split_sha256": None if split_csv is None else file_sha256(split_csv),
        "subset": subset if split_csv else "all",
        "temperature": run.temperature,
        "covid_threshold": threshold,
        "bootstrap": {"n": n_boot, "seed": seed, "unit": "split_group"},
        "skipped_files": data.errors,
        **provenance(),
    }
    return out, data, probs


def evaluate_run(run: LoadedRun, data_dir: Path, **kwargs: Any) -> dict[str, Any]:
    """Evaluate a loaded run on a data directory (keywords as `evaluate_subset`). Returns the eval JSON."""
    return evaluate_subset(run, data_dir, **kwargs)[0]

