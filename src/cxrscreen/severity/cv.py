"""Repeated grouped K-fold cross-validation of the severity regressor, its report and the shipped fit.

Folds are grouped by split_group (no patient or near-duplicate in two folds); each repeat reshuffles the
groups. Per repeat the out-of-fold predictions of all images give MAE and Pearson r per score; the point
figure is their mean over repeats, the 95 % CI the percentile interval of that mean over bootstrap
resamples of whole split_groups (the repeats' fold-to-fold spread is reported beside it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.evaluation.metrics import grouped_bootstrap_ci
from cxrscreen.io.files import write_json
from cxrscreen.severity.features import FeatureExtractor, FeatureSpec, build_backbone, pool
from cxrscreen.severity.model import SeverityRegressor, group_folds
from cxrscreen.severity.scores import TARGETS, SeveritySet, load_severity_set
from cxrscreen.transforms.preprocess import PreprocessConfig

REFERENCE = {
    "source": "Cohen et al. 2020, arXiv 2005.11856 (same images; features pretrained on large CXR collections)",
    "geographic_extent": {"mae": 1.14, "pearson_r": 0.80},
    "opacity": {"mae": 0.78, "pearson_r": 0.78},
}
_MODEL_PRE = {"clahe": True, "mean": 0.5, "std": 0.5}  # the bundled classifier's normalisation
_IMAGENET_PRE = {"clahe": True, "mean": 0.45, "std": 0.225}  # ImageNet's grey mean / std

_MID = ("blocks.3", "blocks.4", "blocks.5", "blocks.6")  # stride 16 and 32 stages: texture as well as shape


def _pad(size: int, norm: dict[str, Any]) -> PreprocessConfig:
    return PreprocessConfig(size, resize_mode="pad", **norm)


CANDIDATES: dict[str, FeatureSpec] = {
    # the bundled classifier's backbone on its own input (192 px, centre crop 90 %), last features
    "model_crop192_head": FeatureSpec("model", preprocess=PreprocessConfig(192, resize_mode="crop",
                                                                           center_fraction=0.9, **_MODEL_PRE)),
    # the same backbone on the whole image (padded: no lung cut off), middle and last stages
    "model_pad192_b3-b6": FeatureSpec("model", preprocess=_pad(192, _MODEL_PRE), blocks=_MID),
    "imagenet_pad224_head": FeatureSpec("imagenet", preprocess=_pad(224, _IMAGENET_PRE)),
    "imagenet_pad320_head": FeatureSpec("imagenet", preprocess=_pad(320, _IMAGENET_PRE)),
    "imagenet_pad224_head_noclahe": FeatureSpec("imagenet", preprocess=_pad(224, {**_IMAGENET_PRE, "clahe": False})),
    "imagenet_pad192_b3-b6": FeatureSpec("imagenet", preprocess=_pad(192, _IMAGENET_PRE), blocks=_MID),
    "imagenet_pad224_b3-b6": FeatureSpec("imagenet", preprocess=_pad(224, _IMAGENET_PRE), blocks=_MID),
    "imagenet_pad224_b2-b6": FeatureSpec("imagenet", preprocess=_pad(224, _IMAGENET_PRE), blocks=("blocks.2", *_MID)),
    "imagenet_pad256_b3-b6": FeatureSpec("imagenet", preprocess=_pad(256, _IMAGENET_PRE), blocks=_MID),
}


def extract(sset: SeveritySet, spec: FeatureSpec, classifier: Any = None,
            log: Callable[[str], None] = print) -> tuple[np.ndarray, list[int]]:
    """Pooled features (N, D) of the scored images and the width of each stage's part."""
    from cxrscreen.io.xray import read_xray

    ext = FeatureExtractor(build_backbone(spec, classifier), spec)
    images = [ext.prepare(read_xray(p).pixels)[0] for p in sset.paths]
    t0 = time.monotonic()
    maps = ext.maps(images)
    log(f"features {spec.backbone} {spec.preprocess.image_size} px {'+'.join(spec.blocks)}: "
        f"{len(images)} images in {time.monotonic() - t0:.1f} s")
    return pool(maps), [m.shape[1] for m in maps]


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation, None when either side is constant."""
    if np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float | None]]:
    return {t: {"mae": float(np.mean(np.abs(pred[:, i] - y[:, i]))), "pearson_r": pearson(pred[:, i], y[:, i])}
            for i, t in enumerate(TARGETS)}


def crossval(x: np.ndarray, y: np.ndarray, groups: Sequence[str], spec: FeatureSpec, block_dims: Sequence[int], *,
             k: int = 5, repeats: int = 10, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Repeated grouped K-fold CV. Returns per-score {mae, pearson_r: {value, ci95, repeats_min, repeats_max}},
    the out-of-fold predictions (R, N, 2), the fold of each image per repeat (R, N) and the settings."""
    n = len(y)
    oof = np.zeros((repeats, n, y.shape[1]))
    folds = np.zeros((repeats, n), np.int64)
    alphas: list[list[float]] = []
    for r in range(repeats):
        folds[r] = group_folds(groups, k, seed + r)
        for f in range(k):
            tr, te = folds[r] != f, folds[r] == f
            reg = SeverityRegressor.fit(x[tr], y[tr], [g for g, m in zip(groups, tr, strict=True) if m], spec,
                                        block_dims, seed=seed + r)
            oof[r, te] = reg.predict(x[te])
            alphas.append(reg.alphas)
    per_repeat = [_metrics(oof[r], y) for r in range(repeats)]
    summary: dict[str, Any] = {}
    for i, t in enumerate(TARGETS):
        summary[t] = {}
        for name in ("mae", "pearson_r"):
            vals = [m[t][name] for m in per_repeat if m[t][name] is not None]

            def stat(idx: np.ndarray, i: int = i, name: str = name) -> float | None:
                v = [_metrics(oof[r][idx], y[idx])[TARGETS[i]][name] for r in range(repeats)]
                v = [a for a in v if a is not None]
                return float(np.mean(v)) if v else None

            ci = grouped_bootstrap_ci(stat, groups, n_boot=n_boot, seed=seed)
            summary[t][name] = {"value": float(np.mean(vals)), "ci95": list(ci) if ci else None,
                                "repeats_min": float(np.min(vals)), "repeats_max": float(np.max(vals))}
    return {**summary, "oof": oof, "folds": folds, "alphas": alphas,
            "settings": {"k": k, "repeats": repeats, "seed": seed, "n_boot": n_boot, "n_images": n,
                         "n_groups": len(set(groups))}}


def scatter_plot(y: np.ndarray, pred: np.ndarray, result: dict[str, Any], out: Path, title: str) -> Path:
    """Predicted (out-of-fold, mean over repeats) against the radiologists' scores, one panel per score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrscreen.severity.scores import TARGET_RANGES

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    for i, (t, ax) in enumerate(zip(TARGETS, axes, strict=True)):
        lo, hi = TARGET_RANGES[t]
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--", label="identity")
        ax.scatter(y[:, i], pred[:, i], s=18, alpha=0.75)
        m, r = result[t]["mae"], result[t]["pearson_r"]
        ref = REFERENCE[t]
        ax.set_title(f"{t.replace('_', ' ')} ({lo:g}-{hi:g})\nMAE {m['value']:.2f} [{m['ci95'][0]:.2f}, "
                     f"{m['ci95'][1]:.2f}], r {r['value']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]\n"
                     f"Cohen et al.: MAE {ref['mae']:.2f}, r {ref['pearson_r']:.2f}", fontsize=9)
        ax.set_xlabel("radiologists (mean of 3)")
        ax.set_ylabel("predicted (out-of-fold)")
        ax.set_xlim(lo - 0.3, hi + 0.3)
        ax.set_ylim(lo - 0.3, hi + 0.3)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _score(res: dict[str, Any]) -> float:
    """Selection criterion: mean MAE as a fraction of each score's range (lower is better)."""
    from cxrscreen.severity.scores import TARGET_RANGES

    return float(np.mean([res[t]["mae"]["value"] / TARGET_RANGES[t][1] for t in TARGETS]))


def run_cv(data_dir: str | Path, out_dir: str | Path, *, candidates: Sequence[str] | None = None, k: int = 5,
           repeats: int = 10, seed: int = 0, scores: str | Path | None = None, classifier_dir: str | Path | None = None,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Cross-validate each candidate feature set; write cv.json and scatter.png (the best candidate)."""
    from cxrscreen.predict.predictor import load_model
    from cxrscreen.runs.provenance import provenance

    names = list(candidates or CANDIDATES)
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise CXRError(f"unknown severity candidate {unknown[0]!r}; known: {', '.join(CANDIDATES)}")
    sset = load_severity_set(data_dir, scores)
    run = load_model(classifier_dir)
    results: dict[str, Any] = {}
    best_oof: dict[str, np.ndarray] = {}
    for name in names:
        t0 = time.monotonic()
        x, dims = extract(sset, CANDIDATES[name], run.model, log=log)
        res = crossval(x, sset.targets, sset.groups, CANDIDATES[name], dims, k=k, repeats=repeats, seed=seed)
        best_oof[name] = res.pop("oof")
        folds = res.pop("folds")
        res["features"] = CANDIDATES[name].to_dict()
        res["feature_dim"] = int(x.shape[1])
        chosen = res.pop("alphas")
        res["alphas_chosen"] = {t: sorted({a[i] for a in chosen}) for i, t in enumerate(TARGETS)}
        res["seconds"] = round(time.monotonic() - t0, 1)
        results[name] = res
        log(f"{name}: " + ", ".join(f"{t} MAE {res[t]['mae']['value']:.3f} r {res[t]['pearson_r']['value']:.3f}"
                                    for t in TARGETS))
    best = min(results, key=lambda c: _score(results[c]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = best_oof[best].mean(0)
    scatter_plot(sset.targets, pred, results[best], out / "scatter.png",
                 f"severity, {best}: ridge, {repeats} x grouped {k}-fold CV, {len(sset)} images, "
                 f"{len(set(sset.groups))} split_groups")
    report = {
        "selected": best,
        "selection": "lowest mean of MAE / score range over the two scores (chosen on these same folds)",
        "reference": REFERENCE,
        "candidates": results,
        "out_of_fold": [{"image": im, "split_group": g, **{t: float(sset.targets[j, i]) for i, t in enumerate(TARGETS)},
                         **{f"pred_{t}": float(pred[j, i]) for i, t in enumerate(TARGETS)}}
                        for j, (im, g) in enumerate(zip(sset.images, sset.groups, strict=True))],
        "folds": {"note": "fold of each image (order of out_of_fold) per repeat; the same for every candidate",
                  "per_repeat": folds.tolist()},
        "classifier": {"run_dir": str(run.run_dir), "weights_sha256": run.config.get("weights_sha256")},
        "data": {"manifest": str(data_dir), "n_images": len(sset), "n_groups": len(set(sset.groups))},
        "settings": {"k": k, "repeats": repeats, "seed": seed, "n_boot": 1000},
        **provenance(),
    }
    write_json(out / "cv.json", report)
    return report


def fit_shipped(data_dir: str | Path, out_dir: str | Path, candidate: str, *, cv_json: str | Path | None = None,
                scores: str | Path | None = None, classifier_dir: str | Path | None = None, seed: int = 0,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit `candidate` on every scored image and save it in out_dir (severity.safetensors / .json), with
    the cross-validated figures from cv_json when given."""
    from cxrscreen.io.files import file_sha256
    from cxrscreen.predict.predictor import load_model
    from cxrscreen.runs.provenance import provenance

    if candidate not in CANDIDATES:
        raise CXRError(f"unknown severity candidate {candidate!r}; known: {', '.join(CANDIDATES)}")
    sset = load_severity_set(data_dir, scores)
    run = load_model(classifier_dir)
    spec = CANDIDATES[candidate]
    x, dims = extract(sset, spec, run.model, log=log)
    reg = SeverityRegressor.fit(x, sset.targets, sset.groups, spec, dims, seed=seed)
    extra: dict[str, Any] = {"candidate": candidate, "seed": seed, **provenance(),
                             "data": {"manifest": str(data_dir), "n_images": len(sset),
                                      "n_groups": len(set(sset.groups))}}
    if spec.backbone == "model":
        extra["classifier_weights_sha256"] = run.config.get("weights_sha256")
    if cv_json is not None:
        cv = json.loads(Path(cv_json).read_text())
        if candidate not in cv["candidates"]:
            raise CXRError(f"{candidate!r} was not cross-validated in this file", cv_json)
        c = cv["candidates"][candidate]
        extra["cv"] = {"file": str(cv_json), "sha256": file_sha256(Path(cv_json)), "settings": cv["settings"],
                       **{t: {m: c[t][m] for m in ("mae", "pearson_r")} for t in TARGETS}}
        extra["reference"] = REFERENCE
    path = reg.save(out_dir, extra)
    from cxrscreen.severity.card import update_card

    log(f"wrote {path} (alphas {reg.alphas})" + ("; updated the model card" if update_card(out_dir) else ""))
    return json.loads(path.read_text())
