"""Repeated grouped K-fold cross-validation of the severity regressor, its report and the shipped fit.

Folds are grouped by split_group (no patient or near-duplicate in two folds); each repeat reshuffles the
groups. Per repeat the out-of-fold predictions of all images give MAE and Pearson r per score; the point
figure is their mean over repeats, the 95 % CI the percentile interval of that mean over bootstrap
resamples of whole split_groups (the repeats' fold-to-fold spread is reported beside it).

The headline figure is nested: in each outer fold the feature set (and, inside ``SeverityRegressor.fit``,
each score's ridge penalty) is the one with the lowest inner grouped-CV error on that fold's training
images only, and the outer fold is scored with it (``nested``); every candidate sees the same outer and
inner folds. Each candidate's own figures are reported beside it, but picking the best of them on the
same folds would be optimistic.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.evaluation.metrics import grouped_bootstrap_ci
from cxrscreen.io.files import write_json
from cxrscreen.severity.features import FeatureExtractor, FeatureSpec, build_backbone
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
_B26 = ("blocks.2", *_MID)
_NOCLAHE = {**_IMAGENET_PRE, "clahe": False}


def _pad(size: int, norm: dict[str, Any]) -> PreprocessConfig:
    return PreprocessConfig(size, resize_mode="pad", **norm)


def candidate_name(spec: FeatureSpec) -> str:
    """A feature set's name: backbone (and arch unless Lite0), resize mode and size, stages, then the
    options that differ from the defaults (noclahe, lungs, flip)."""
    p = spec.preprocess
    arch = "" if spec.arch == "tf_efficientnet_lite0" else "-" + spec.arch.removeprefix("tf_efficientnet_")
    idx = [b[7:] for b in spec.blocks if b != "head"]
    stages = "head" if spec.blocks == ("head",) else f"b{idx[0]}-b{idx[-1]}" if len(idx) == len(spec.blocks) \
        else "+".join(b.removeprefix("blocks.") for b in spec.blocks)
    opts = ("_noclahe" if not p.clahe else "") + ("_" + spec.pooling if spec.pooling != "image" else "") + \
        ("_flip" if spec.flip else "")
    return f"{spec.backbone}{arch}_{p.resize_mode}{p.image_size}_{stages}{opts}"


def _imagenet(size: int, blocks: tuple[str, ...], *, norm: dict[str, Any] = _IMAGENET_PRE, arch: str = "lite0",
              pooling: str = "image", flip: bool = False) -> FeatureSpec:
    return FeatureSpec("imagenet", arch=f"tf_efficientnet_{arch}", preprocess=_pad(size, norm), blocks=blocks,
                       pooling=pooling, flip=flip)


_SPECS: list[FeatureSpec] = [
    # the bundled classifier's backbone on its own input (192 px, centre crop 90 %), last features
    FeatureSpec("model", preprocess=PreprocessConfig(192, resize_mode="crop", center_fraction=0.9, **_MODEL_PRE)),
    # the same backbone on the whole image (padded: no lung cut off), middle and last stages
    FeatureSpec("model", preprocess=_pad(192, _MODEL_PRE), blocks=_MID),
    _imagenet(224, ("head",)), _imagenet(320, ("head",)), _imagenet(224, ("head",), norm=_NOCLAHE),
    _imagenet(192, _MID), _imagenet(224, _MID), _imagenet(256, _MID), _imagenet(224, _B26),
    # each lung's atlas box averaged on its own, flip averaging, CLAHE off, and the larger Lite1 / Lite2
    # (specs that share maps are adjacent: run_cv keeps one set of maps in memory)
    _imagenet(224, _B26, pooling="lungs"), _imagenet(224, _B26, flip=True),
    _imagenet(224, _B26, pooling="lungs", flip=True), _imagenet(224, _B26, norm=_NOCLAHE),
    _imagenet(224, _B26, norm=_NOCLAHE, pooling="lungs"),
    _imagenet(224, _B26, norm=_NOCLAHE, pooling="lungs", flip=True),
    _imagenet(240, _B26, arch="lite1", pooling="lungs"), _imagenet(260, _B26, arch="lite2", pooling="lungs"),
    _imagenet(240, _B26, norm=_NOCLAHE, arch="lite1", pooling="lungs", flip=True),
    _imagenet(260, _B26, norm=_NOCLAHE, arch="lite2", pooling="lungs", flip=True),
]
CANDIDATES: dict[str, FeatureSpec] = {candidate_name(spec): spec for spec in _SPECS}
ATLAS_BOX_CANDIDATES: tuple[str, ...] = tuple(CANDIDATES)
"""The feature sets before the lung segmenter, per-lung ones pooled over the atlas boxes (`--candidate NAME` each:
docs/results/severity/cv_atlas_boxes.json)."""
LUNG_MASK_CANDIDATES: dict[str, FeatureSpec] = {
    candidate_name(s): s for s in (replace(spec, pooling="lung_masks") for spec in _SPECS if spec.pooling == "lungs")}
"""The atlas-box ("lungs") candidates with the segmented lungs instead."""
CANDIDATES.update(LUNG_MASK_CANDIDATES)
DEFAULT_CANDIDATES: tuple[str, ...] = tuple(
    candidate_name(replace(s, pooling="lung_masks")) if s.pooling == "lungs" else candidate_name(s) for s in _SPECS)
"""What `severity cv` tries unless told otherwise: the atlas-box set with each per-lung candidate pooled over the
segmented lungs instead (same number of candidates, same order); in the nested CV it beat the atlas-box set
(geographic extent MAE 1.06 against 1.16, opacity 0.77 against 0.79; docs/results/severity/cv.json and
cv_atlas_boxes.json)."""


def extract(sset: SeveritySet, spec: FeatureSpec, classifier: Any = None, log: Callable[[str], None] = print,
            cache: dict[Any, Any] | None = None) -> tuple[np.ndarray, list[int]]:
    """Features (N, D) of the scored images and the width of each stage's part; `cache` keeps the maps of
    one backbone, preprocessing, stages and flip for the specs that differ only in their pooling."""
    from cxrscreen.io.xray import read_xray

    ext = FeatureExtractor(build_backbone(spec, classifier), spec)
    key = (spec.backbone, spec.arch, spec.preprocess, spec.blocks, spec.flip)
    if cache is None or key not in cache:
        pixels = [read_xray(p).pixels for p in sset.paths]
        prepared = [ext.prepare(px) for px in pixels]
        t0 = time.monotonic()
        maps = ext.maps([im for im, _ in prepared])
        log(f"features {spec.backbone} {spec.arch} {spec.preprocess.image_size} px {'+'.join(spec.blocks)}"
            f"{' flip' if spec.flip else ''}: {len(prepared)} images in {time.monotonic() - t0:.1f} s")
        geoms = [g for _, g in prepared]
        entry = (maps, geoms, pixels if spec.pooling == "lung_masks" else None)
        if cache is not None:
            masks_kept = cache.get("lung_masks")
            cache.clear()  # the candidates sharing maps are adjacent; keep one set in memory
            cache[key] = entry
            if masks_kept is not None:
                cache["lung_masks"] = masks_kept
    else:
        entry = cache[key]
    maps, geoms = entry[0], entry[1]
    masks = None
    if spec.pooling == "lung_masks":
        masks = segmented_lungs(sset.paths, geoms, entry[2], cache)
    return ext.features(maps, geoms, masks), [m.shape[1] for m in maps]


def segmented_lungs(paths: Sequence[Any], geoms: Sequence[Any], pixels: Sequence[np.ndarray] | None,
                    cache: dict[Any, Any] | None) -> list[np.ndarray]:
    """The bundled segmenter's lung label maps of the images, moved onto each geometry's model grid; the
    full-size masks are kept in `cache` (under "lung_masks") across feature sets."""
    from cxrscreen.io.xray import read_xray
    from cxrscreen.lungs.masks import mask_to_model
    from cxrscreen.lungs.segmenter import bundled_segmenter

    store = cache.setdefault("lung_masks", {}) if cache is not None else {}
    todo = [i for i, p in enumerate(paths) if str(p) not in store]
    if todo:
        px = [pixels[i] if pixels is not None else read_xray(paths[i]).pixels for i in todo]
        for i, res in zip(todo, bundled_segmenter().segment_many(px), strict=True):
            store[str(paths[i])] = res.mask
    return [mask_to_model(store[str(p)], g) for p, g in zip(paths, geoms, strict=True)]


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation, None when either side is constant."""
    if np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _per_repeat(pred: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    """MAE or Pearson r of predictions (R, n) of one score y (n,) per repeat, vectorised (what the bootstrap
    evaluates); r leaves out the repeats where either side is constant, as ``pearson``."""
    if name == "mae":
        return np.abs(pred - y).mean(1)
    p, t = pred - pred.mean(1, keepdims=True), y - y.mean()
    sp, st = np.sqrt((p**2).sum(1)), np.sqrt((t**2).sum())
    ok = (pred.std(1) >= 1e-12) & (y.std() >= 1e-12)
    return (p[ok] @ t) / (sp[ok] * st)


def _metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, dict[str, float | None]]:
    return {t: {"mae": float(np.mean(np.abs(pred[:, i] - y[:, i]))), "pearson_r": pearson(pred[:, i], y[:, i])}
            for i, t in enumerate(TARGETS)}


def summarize(oof: np.ndarray, y: np.ndarray, groups: Sequence[str], *, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Per score {mae, pearson_r: {value, ci95, repeats_min, repeats_max}} of out-of-fold predictions
    (R, N, 2): the mean over repeats, its CI over bootstrap resamples of split_groups."""
    repeats = len(oof)
    per_repeat = [_metrics(oof[r], y) for r in range(repeats)]
    summary: dict[str, Any] = {}
    for i, t in enumerate(TARGETS):
        summary[t] = {}
        for name in ("mae", "pearson_r"):
            vals = [m[t][name] for m in per_repeat if m[t][name] is not None]

            def stat(idx: np.ndarray, i: int = i, name: str = name) -> float | None:
                v = _per_repeat(oof[:, idx, i], y[idx, i], name)
                return float(np.mean(v)) if len(v) else None

            ci = grouped_bootstrap_ci(stat, groups, n_boot=n_boot, seed=seed)
            summary[t][name] = {"value": float(np.mean(vals)), "ci95": list(ci) if ci else None,
                                "repeats_min": float(np.min(vals)), "repeats_max": float(np.max(vals))}
    return summary


def crossval(x: np.ndarray, y: np.ndarray, groups: Sequence[str], spec: FeatureSpec, block_dims: Sequence[int], *,
             k: int = 5, repeats: int = 10, seed: int = 0, n_boot: int = 1000) -> dict[str, Any]:
    """Repeated grouped K-fold CV. Returns per-score figures (``summarize``), the out-of-fold predictions
    (R, N, 2), the fold of each image per repeat (R, N), each outer fold's inner grouped-CV MAE on its
    training images at the chosen penalties (R, K, 2: what ``nested`` selects by) and the settings."""
    n = len(y)
    oof = np.zeros((repeats, n, y.shape[1]))
    folds = np.zeros((repeats, n), np.int64)
    inner = np.zeros((repeats, k, y.shape[1]))
    alphas: list[list[float]] = []
    for r in range(repeats):
        folds[r] = group_folds(groups, k, seed + r)
        for f in range(k):
            tr, te = folds[r] != f, folds[r] == f
            reg = SeverityRegressor.fit(x[tr], y[tr], [g for g, m in zip(groups, tr, strict=True) if m], spec,
                                        block_dims, seed=seed + r)
            oof[r, te] = reg.predict(x[te])
            inner[r, f] = [reg.meta["inner_mae"][t] for t in TARGETS]
            alphas.append(reg.alphas)
    return {**summarize(oof, y, groups, n_boot=n_boot, seed=seed), "oof": oof, "folds": folds, "inner_mae": inner,
            "alphas": alphas, "settings": {"k": k, "repeats": repeats, "seed": seed, "n_boot": n_boot, "n_images": n,
                                           "n_groups": len(set(groups))}}


def selection_score(mae: Any) -> Any:
    """Selection criterion of per-score MAEs (last axis in TARGETS order): their mean as a fraction of each
    score's range (lower is better)."""
    from cxrscreen.severity.scores import TARGET_RANGES

    return np.mean(np.asarray(mae) / np.array([TARGET_RANGES[t][1] for t in TARGETS]), axis=-1)


def nested(results: dict[str, dict[str, Any]], y: np.ndarray, groups: Sequence[str], *, n_boot: int = 1000,
           seed: int = 0) -> dict[str, Any]:
    """Nested figures from the ``crossval`` results of several candidates on the same folds: in each outer
    fold the candidate with the lowest inner-CV ``selection_score`` on that fold's training images, scored
    on the outer fold. Returns ``summarize``'s figures, the chosen candidate per repeat and fold, how often
    each was chosen, and the out-of-fold predictions (R, N, 2)."""
    names = list(results)
    folds = results[names[0]]["folds"]
    if any(not np.array_equal(results[c]["folds"], folds) for c in names):
        raise CXRError("nested selection needs every candidate cross-validated on the same folds")
    scores = np.stack([selection_score(results[c]["inner_mae"]) for c in names])  # (C, R, K)
    pick = scores.argmin(0)
    oof = np.zeros_like(results[names[0]]["oof"])
    for r in range(folds.shape[0]):
        for f in range(pick.shape[1]):
            te = folds[r] == f
            oof[r, te] = results[names[pick[r, f]]]["oof"][r, te]
    chosen = [[names[i] for i in row] for row in pick]
    counts = {c: int((pick == i).sum()) for i, c in enumerate(names) if (pick == i).any()}
    return {**summarize(oof, y, groups, n_boot=n_boot, seed=seed), "chosen": chosen,
            "chosen_counts": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "oof": oof}


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


def _figures(res: dict[str, Any]) -> str:
    return ", ".join(f"{t} MAE {res[t]['mae']['value']:.3f} r {res[t]['pearson_r']['value']:.3f}" for t in TARGETS)


def run_cv(data_dir: str | Path, out_dir: str | Path, *, candidates: Sequence[str] | None = None, k: int = 5,
           repeats: int = 10, seed: int = 0, scores: str | Path | None = None, classifier_dir: str | Path | None = None,
           n_boot: int = 1000, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Cross-validate each candidate feature set and the nested selection among them; write cv.json and
    scatter.png (the nested out-of-fold predictions). A candidate whose backbone cannot be built here
    (e.g. its weights package is not installed) is skipped and listed as such."""
    from cxrscreen.predict.predictor import load_model
    from cxrscreen.runs.provenance import provenance

    names = list(candidates or DEFAULT_CANDIDATES)
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise CXRError(f"unknown severity candidate {unknown[0]!r}; known: {', '.join(CANDIDATES)}")
    sset = load_severity_set(data_dir, scores)
    run = load_model(classifier_dir)
    y, groups = sset.targets, sset.groups
    results: dict[str, Any] = {}
    full: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    cache: dict[Any, Any] = {}
    for name in names:
        t0 = time.monotonic()
        spec = CANDIDATES[name]
        try:
            x, dims = extract(sset, spec, run.model, log=log, cache=cache)
        except CXRError as exc:
            skipped[name] = str(exc)
            log(f"{name}: skipped ({exc})")
            continue
        res = crossval(x, y, groups, spec, dims, k=k, repeats=repeats, seed=seed, n_boot=n_boot)
        full[name] = res
        everything = SeverityRegressor.fit(x, y, groups, spec, dims, seed=seed)
        results[name] = {
            **{t: res[t] for t in TARGETS}, "features": spec.to_dict(), "feature_dim": int(x.shape[1]),
            "alphas_chosen": {t: sorted({a[i] for a in res["alphas"]}) for i, t in enumerate(TARGETS)},
            "inner_cv_all_images": {"mae": everything.meta["inner_mae"],
                                    "selection_score": float(selection_score([everything.meta["inner_mae"][t]
                                                                              for t in TARGETS]))},
            "seconds": round(time.monotonic() - t0, 1)}
        log(f"{name}: {_figures(res)}")
    if not results:
        raise CXRError("no severity candidate could be built", data_dir)
    nest = nested(full, y, groups, n_boot=n_boot, seed=seed)
    pred = nest.pop("oof").mean(0)
    selected = next(iter(nest["chosen_counts"]))
    on_all = min(results, key=lambda c: results[c]["inner_cv_all_images"]["selection_score"])
    log(f"nested: {_figures(nest)}; chosen {nest['chosen_counts']}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scatter_plot(y, pred, nest, out / "scatter.png",
                 f"severity, nested selection among {len(results)} feature sets (most often chosen: {selected})\n"
                 f"ridge, {repeats} x grouped {k}-fold CV, {len(sset)} images, {len(set(groups))} split_groups")
    folds = full[next(iter(full))]["folds"]
    report = {
        "headline": "nested",
        "nested": {**nest, "procedure": "in each outer fold, the candidate (and each score's ridge penalty) with the "
                   "lowest inner grouped 5-fold CV error (mean of MAE / score range) on that fold's training images; "
                   "chosen per outer fold, so the figure carries no selection bias"},
        "selected": selected,
        "selection": "the candidate the nested procedure chose most often (what `severity fit` ships)",
        "selected_by_inner_cv_on_all_images": on_all,
        "reference": REFERENCE,
        "candidates": results,
        "skipped": skipped,
        "out_of_fold": [{"image": im, "split_group": g, **{t: float(y[j, i]) for i, t in enumerate(TARGETS)},
                         **{f"pred_{t}": float(pred[j, i]) for i, t in enumerate(TARGETS)}}
                        for j, (im, g) in enumerate(zip(sset.images, groups, strict=True))],
        "out_of_fold_note": "nested predictions, mean over repeats",
        "folds": {"note": "fold of each image (order of out_of_fold) per repeat; the same for every candidate",
                  "per_repeat": folds.tolist()},
        "classifier": {"run_dir": str(run.run_dir), "weights_sha256": run.config.get("weights_sha256")},
        "data": {"manifest": str(data_dir), "n_images": len(sset), "n_groups": len(set(groups))},
        "settings": {"k": k, "repeats": repeats, "seed": seed, "n_boot": n_boot, "inner_k": 5},
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
    spec = CANDIDATES[candidate]
    sset = load_severity_set(data_dir, scores)
    run = load_model(classifier_dir)
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
        c, nest = cv["candidates"][candidate], cv.get("nested")
        extra["cv"] = {"file": str(cv_json), "sha256": file_sha256(Path(cv_json)), "settings": cv["settings"],
                       **{t: {m: (nest or c)[t][m] for m in ("mae", "pearson_r")} for t in TARGETS},
                       "figures": "nested (selection among the candidates inside each outer fold)" if nest else
                       "this candidate's own (chosen on the same folds: optimistic)",
                       "candidate": {t: {m: c[t][m] for m in ("mae", "pearson_r")} for t in TARGETS}}
        if nest:
            extra["cv"]["n_candidates"] = len(cv["candidates"])
            extra["cv"]["chosen_counts"] = nest["chosen_counts"]
        extra["reference"] = REFERENCE
    path = reg.save(out_dir, extra)
    from cxrscreen.severity.card import update_card

    log(f"wrote {path} (alphas {reg.alphas})" + ("; updated the model card" if update_card(out_dir) else ""))
    return json.loads(path.read_text())
