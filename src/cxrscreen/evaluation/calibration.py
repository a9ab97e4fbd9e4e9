"""Temperature scaling and the COVID operating point, fitted on a run's validation subset.

`calibrate_run(run_dir, data_dir, split_csv)` fits one temperature T (Guo et al. 2017: minimise the NLL
of softmax(logits / T) on val), then picks the highest threshold on the calibrated COVID probability
whose sensitivity on val reaches the target, and reports both on test (ECE and NLL before / after,
the operating point's sensitivity and specificity with patient-grouped 95 % CIs). T and the threshold
are stored in the run's config.json (`calibration`, `operating_point`), where `LoadedRun.temperature`,
`LoadedRun.covid_threshold` and `Predictor` read them; the full report goes to eval/calibration.json
and the reliability diagram to eval/reliability.png.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.data.manifest import manifest_hash
from cxrscreen.data.subsets import SubsetData, load_subset
from cxrscreen.errors import CXRError
from cxrscreen.evaluation.metrics import (
    binary_rates,
    covid_vs_rest,
    ece_from_bins,
    expected_calibration_error,
    reliability_bins,
)
from cxrscreen.io.files import file_sha256, write_json
from cxrscreen.runs.decision import DecisionRule, decide
from cxrscreen.runs.provenance import provenance
from cxrscreen.runs.run_dir import LoadedRun, load_run, read_config, write_config
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir

T_MIN, T_MAX = 0.05, 20.0
N_BINS = 15
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


# ------------------------------------------------------------------------------------------ primitives
def _check_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
        raise CXRError(f"logits must be (N, C) and labels (N,), got {z.shape} and {y.shape}")
    if len(y) == 0:
        raise CXRError("no cases to fit the temperature on")
    if not np.isfinite(z).all():
        raise CXRError("logits contain NaN or infinite values")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise CXRError(f"labels must lie in [0, {z.shape[1] - 1}]")
    return z, y


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) along the last axis, numerically stable, float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) at the true labels."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.int64)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in [0.05, 20] that minimises the NLL of softmax(logits / T).

    The NLL is convex in 1/T, hence unimodal in log T: a golden-section search over log T on the
    clamp interval is deterministic and needs no gradient. T > 1 softens over-confident logits.
    """
    z, y = _check_logits(logits, labels)
    lo, hi = math.log(T_MIN), math.log(T_MAX)

    def f(log_t: float) -> float:
        return nll(z, y, math.exp(log_t))

    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-7:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    candidates = (T_MIN, T_MAX, min(max(math.exp((a + b) / 2), T_MIN), T_MAX))
    return float(min(candidates, key=lambda t: (nll(z, y, t), t)))


def choose_threshold(
    p_covid: np.ndarray, is_covid: np.ndarray, target_sensitivity: float = 0.95
) -> dict[str, Any]:
    """The highest threshold t on the COVID probability with sensitivity (p >= t among COVID) >= target.

    t is the k-th largest COVID-case score, k = ceil(target * n_covid): any higher threshold calls fewer
    than k COVID cases positive. Returns threshold, target, sensitivity and specificity on these cases,
    and the case counts. CXRError when there is no COVID case or the target is outside (0, 1].
    """
    p = np.asarray(p_covid, dtype=np.float64).ravel()
    pos = np.asarray(is_covid, dtype=bool).ravel()
    if len(p) != len(pos):
        raise CXRError(f"{len(p)} probabilities but {len(pos)} labels")
    if not 0.0 < target_sensitivity <= 1.0:
        raise CXRError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    n_pos = int(pos.sum())
    if n_pos == 0:
        raise CXRError("no COVID cases in the validation subset: cannot choose an operating point")
    if not np.isfinite(p).all():
        raise CXRError("probabilities contain NaN or infinite values")
    k = min(max(math.ceil(target_sensitivity * n_pos - 1e-9), 1), n_pos)
    threshold = float(np.sort(p[pos])[::-1][k - 1])
    sens, spec = binary_rates(pos, p >= threshold)
    return {
        "threshold": threshold,
        "target_sensitivity": float(target_sensitivity),
        "val_sensitivity": sens,
        "val_specificity": spec,
        "n_val_covid": n_pos,
        "n_val_other": int((~pos).sum()),
    }


def reliability_diagram(
    bins_before: Sequence[dict[str, float]],
    bins_after: Sequence[dict[str, float]],
    path: Path,
    *,
    title: str,
) -> Path:
    """Write a PNG reliability diagram: accuracy vs confidence before and after calibration, the diagonal,
    and each curve's ECE in the legend. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    curves = ((bins_before, "uncalibrated", "tab:red"), (bins_after, "calibrated", "tab:blue"))
    for bins, name, color in curves:
        if bins:
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=color,
                    label=f"{name} (ECE {ece_from_bins(bins):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------------ run level
def run_logits(run: LoadedRun, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Uncalibrated logits (N, C) of preprocessed uint8 images (N, S, S), from the run's task."""
    return run.task.logits(run, images, batch_size=batch_size).reshape(len(images), len(run.classes))


def _subset_figures(data: SubsetData, logits: np.ndarray, temperature: float) -> dict[str, Any]:
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "n": int(len(data.labels)),
        "nll_before": nll(logits, data.labels),
        "nll_after": nll(logits, data.labels, temperature),
        "ece_before": expected_calibration_error(data.labels, before, N_BINS),
        "ece_after": expected_calibration_error(data.labels, after, N_BINS),
        "reliability_before": reliability_bins(data.labels, before, N_BINS),
        "reliability_after": reliability_bins(data.labels, after, N_BINS),
    }


def specificity_per_source(data: SubsetData, probs: np.ndarray, classes: Sequence[str], threshold: float
                           ) -> dict[str, Any]:
    """COVID specificity at `threshold` per source among its non-COVID images ({n, specificity}; None if none)."""
    rates = worst_source_rates(data, probs, classes, DecisionRule(threshold=threshold))["per_source"]
    src, non_covid = np.asarray(data.sources), data.labels != list(classes).index("covid")
    return {s: {"n_non_covid": int((non_covid & (src == s)).sum()), "specificity": r["specificity"]}
            for s, r in rates.items()}


def worst_source_rates(data: SubsetData, probs: np.ndarray, classes: Sequence[str], rule: DecisionRule) -> dict:
    """COVID sensitivity and specificity per source under `rule`, and the lowest of them ("worst")."""
    covid = list(classes).index("covid")
    pred = decide(probs, classes, rule) == covid
    src = np.asarray(data.sources)
    per: dict[str, dict[str, float | None]] = {}
    for s in sorted(set(data.sources)):
        m = src == s
        sens, spec = binary_rates(data.labels[m] == covid, pred[m])
        per[s] = {"sensitivity": sens, "specificity": spec}
    rates = [v for d in per.values() for v in d.values() if v is not None]
    return {"rule": rule.to_dict(), "worst": min(rates) if rates else None, "per_source": per}


def choose_rule(data: SubsetData, probs: np.ndarray, classes: Sequence[str], threshold: float) -> dict[str, Any]:
    """Arg-max or the operating point, whichever has the higher worst per-source COVID sensitivity or
    specificity on `data` (val): the rule that fails least on its weakest source (ties go to arg-max)."""
    cands = [worst_source_rates(data, probs, classes, r) for r in (DecisionRule(), DecisionRule(threshold=threshold))]
    best = max(cands, key=lambda c: -1.0 if c["worst"] is None else c["worst"])
    return {"chosen": best["rule"], "chosen_by": "the higher worst per-source COVID sensitivity or specificity on val",
            "candidates": cands}


def calibrate_run(
    run_dir: Path,
    data_dir: Path,
    split_csv: Path,
    *,
    target_sensitivity: float = 0.95,
    cache_dir: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit T and the COVID threshold on val, report on test, store them in config.json (see module doc).

    Returns the report also written to <run_dir>/eval/calibration.json.
    """
    run_dir, data_dir, split_csv = Path(run_dir), Path(data_dir), Path(split_csv)
    run, covid, val, test = _calibration_data(run_dir, data_dir, split_csv, cache_dir)

    val_logits = run_logits(run, val.images)
    temperature = fit_temperature(val_logits, val.labels)
    val_probs = softmax(val_logits, temperature)
    op = choose_threshold(val_probs[:, covid], val.labels == covid, target_sensitivity)
    threshold = op["threshold"]
    val_fig = _subset_figures(val, val_logits, temperature)
    val_spec = specificity_per_source(val, val_probs, run.classes, threshold)
    rule_choice = choose_rule(val, val_probs, run.classes, threshold)
    test_fig, test_spec = _test_figures(run, test, temperature, covid, threshold, n_boot=n_boot, seed=seed)

    calibration = _calibration_section(temperature, val_fig, test_fig)
    operating_point = _operating_point_section(op, val, val_spec, test_fig, test_spec)
    config = read_config(run_dir)
    config["calibration"] = calibration
    config["operating_point"] = operating_point
    config["decision"] = rule_choice["chosen"]
    write_config(run_dir, config)

    shown = test_fig or val_fig
    png = reliability_diagram(
        shown["reliability_before"], shown["reliability_after"], run_dir / "eval" / "reliability.png",
        title=f"{run.arch}, {'test' if test_fig else 'val'} subset (n={shown['n']}), T = {temperature:.3f}",
    )
    report: dict[str, Any] = {
        "calibration": calibration,
        "operating_point": {**operating_point, "n_val_covid": op["n_val_covid"],
                            "n_val_other": op["n_val_other"]},
        "decision": rule_choice,
        "val": val_fig,
        "test": test_fig,
        "meta": _report_meta(run, run_dir, data_dir, split_csv, n_boot=n_boot, seed=seed,
                             skipped={**val.errors, **test.errors}, png=png),
    }
    write_json(run_dir / "eval" / "calibration.json", report)
    return report


def _calibration_data(run_dir: Path, data_dir: Path, split_csv: Path, cache_dir: Path | None
                      ) -> tuple[LoadedRun, int, SubsetData, SubsetData]:
    """(the run, the index of its covid class, its val subset, its test subset); CXRError for a run that is no
    classifier with a covid class, or a split without val images."""
    run = load_run(run_dir)
    if not run.task.has_logits:
        raise CXRError(f"calibration fits classifier logits; {run.arch} is a {run.kind}", run_dir)
    if "covid" not in run.classes:
        raise CXRError(f"the run's classes {run.classes} have no 'covid' class", run_dir)
    cache = PreprocessedCache(run.preprocess, cache_dir if cache_dir is not None else default_cache_dir())
    val = load_subset(data_dir, split_csv, "val", cache, run.classes)
    test = load_subset(data_dir, split_csv, "test", cache, run.classes)
    if len(val.labels) == 0:
        raise CXRError("the split has no usable val images to calibrate on", split_csv)
    return run, run.classes.index("covid"), val, test


def _test_figures(run: LoadedRun, test: SubsetData, temperature: float, covid: int, threshold: float, *,
                  n_boot: int, seed: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(calibration figures with COVID-vs-rest at the threshold, specificity per source) of the test subset;
    (None, None) when the split has no test images."""
    if not len(test.labels):
        return None, None
    test_logits = run_logits(run, test.images)
    test_fig = _subset_figures(test, test_logits, temperature)
    test_probs = softmax(test_logits, temperature)
    test_fig["covid_vs_rest"] = covid_vs_rest(
        test.labels, test_probs, test.groups, positive=covid, threshold=threshold, n_boot=n_boot, seed=seed,
    )
    return test_fig, specificity_per_source(test, test_probs, run.classes, threshold)


def _calibration_section(temperature: float, val_fig: dict[str, Any], test_fig: dict[str, Any] | None
                         ) -> dict[str, Any]:
    """config.json's `calibration`: T and the ECE before / after on val and test."""
    return {
        "method": "temperature",
        "temperature": temperature,
        "fitted_on": "val",
        "ece_val_before": val_fig["ece_before"],
        "ece_val_after": val_fig["ece_after"],
        "ece_test_before": test_fig["ece_before"] if test_fig else None,
        "ece_test_after": test_fig["ece_after"] if test_fig else None,
        "n_val": val_fig["n"],
    }


def _operating_point_section(op: dict[str, Any], val: SubsetData, val_spec: dict[str, Any],
                             test_fig: dict[str, Any] | None, test_spec: dict[str, Any] | None
                             ) -> dict[str, Any]:
    """config.json's `operating_point`: the COVID threshold chosen on val, its val and test rates."""
    cvr = test_fig["covid_vs_rest"] if test_fig else None
    return {
        "class": "covid",
        "threshold": op["threshold"],
        "target_sensitivity": op["target_sensitivity"],
        "chosen_on": "val",
        "val_sources": sorted(set(val.sources)),
        "val_sensitivity": op["val_sensitivity"],
        "val_specificity": op["val_specificity"],
        "test_sensitivity": cvr["sensitivity"] if cvr else None,
        "test_specificity": cvr["specificity"] if cvr else None,
        "val_specificity_per_source": val_spec,
        "test_specificity_per_source": test_spec,
    }


def _report_meta(run: LoadedRun, run_dir: Path, data_dir: Path, split_csv: Path, *, n_boot: int, seed: int,
                 skipped: dict[str, Any], png: Path) -> dict[str, Any]:
    """The calibration report's provenance: model, data and split hashes, bootstrap, skipped files, versions."""
    return {
        "model": str(run_dir),
        "arch": run.arch,
        "weights_sha256": run.config.get("weights_sha256"),
        "data": str(data_dir),
        "manifest_sha256": manifest_hash(data_dir),
        "split": str(split_csv),
        "split_sha256": file_sha256(split_csv),
        "n_bins": N_BINS,
        "bootstrap": {"n": n_boot, "seed": seed, "unit": "split_group"},
        "skipped_files": skipped,
        "reliability_png": str(png),
        **provenance(),
    }
