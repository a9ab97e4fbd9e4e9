"""Fit a feature-head model: cached frozen features -> standardisation -> logistic regression (scikit-learn,
L-BFGS) with its penalty chosen by patient-grouped cross-validation -> a normal run directory.

`fit_head_run(HeadRecipe(...), data_dir, split_csv, out_dir)` fits the head on the split's train images (only
the recipe's `sources` when it names some), copies the coefficients into the model's linear layer, writes
model.safetensors + config.json (the recipe, the CV table, `model_options`, `cam_layer`, data hashes, seconds),
and then calibrates on val (`cxrscreen calibrate`: temperature, COVID operating point, decision rule).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cxrscreen import CLASSES
from cxrscreen.data.manifest import manifest_hash
from cxrscreen.data.subsets import SubsetData, load_subset
from cxrscreen.errors import CXRError
from cxrscreen.io.files import file_sha256
from cxrscreen.transforms.cache import PreprocessedCache, default_cache_dir
from cxrscreen.transforms.preprocess import PreprocessConfig

REPLAY_FILE = "replay.npz"


def write_replay(out_dir: Path, x: np.ndarray, y: np.ndarray, sources: Sequence[str], *, per_class: int = 300,
                 seed: int = 0) -> dict[str, Any]:
    """Store up to `per_class` training feature rows of each class (float16) as <out_dir>/replay.npz."""
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(y == k))[:per_class] for k in np.unique(y)])
    pick.sort()
    np.savez_compressed(Path(out_dir) / REPLAY_FILE, features=np.asarray(x[pick], np.float16),
                        labels=np.asarray(y[pick], np.int64), sources=np.asarray(sources)[pick].astype(str))
    return {"file": REPLAY_FILE, "rows": int(len(pick)), "per_class": np.bincount(y[pick]).tolist(),
            "seed": seed}


def read_replay(run_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features float64 (N, D), labels (N,), sources (N,)) of a run's replay.npz; CXRError when missing or bad."""
    path = Path(run_dir) / REPLAY_FILE
    if not path.is_file():
        raise CXRError(f"the model has no {REPLAY_FILE} (the training features it replays while adapting); "
                       "refit it with `cxrscreen fit-head`", run_dir)
    try:
        with np.load(path) as z:
            return z["features"].astype(np.float64), z["labels"].astype(np.int64), z["sources"].astype(str)
    except (OSError, KeyError, ValueError) as exc:
        raise CXRError(f"cannot read the replay set ({exc})", path) from exc


ABSENT_CLASS_BIAS = -30.0  # the logit bias of a class the head never saw: its probability stays ~0


@dataclass
class HeadRecipe:
    """A feature-head recipe: backbone, preprocessing, stages, flip, the penalty grid and the training sources.

    cs: inverse L2 strengths tried by grouped CV (the best mean held-out log-loss wins).
    sources: train only on these sources of the split's train subset (None: all of them).
    exclude_sources: leave these sources out (leave-one-source-out).
    """

    arch: str = "lite0_features"
    image_size: int = 224
    clahe: bool = True
    resize_mode: str = "crop"
    center_fraction: float = 0.9
    lung_margin: float = 0.1
    lung_box: str = "mask"
    stages: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6"])
    flip: bool = False
    cs: list[float] = field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1])
    cv_folds: int = 5
    seed: int = 0
    threads: int = 2
    sources: list[str] | None = None
    exclude_sources: list[str] = field(default_factory=list)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size, clahe=self.clahe, resize_mode=self.resize_mode,  # type: ignore[arg-type]
                                center_fraction=self.center_fraction, lung_margin=self.lung_margin,
                                lung_box=self.lung_box, mean=0.5, std=0.5)  # type: ignore[arg-type]

    @property
    def model_options(self) -> dict[str, Any]:
        return {"stages": list(self.stages), "flip": bool(self.flip)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | Path | None = None) -> HeadRecipe:
        """A recipe from a dict (YAML); CXRError naming `where` for an unknown key or a bad value."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CXRError(f"unknown head recipe key(s) {', '.join(sorted(unknown))}; "
                           f"known: {', '.join(sorted(known))}", where)
        try:
            r = cls(**d)
            r.preprocess  # noqa: B018  (validates size, mode, fraction)
        except (TypeError, ValueError) as exc:
            raise CXRError(f"bad head recipe ({exc})", where) from exc
        if not r.cs or any(float(c) <= 0 for c in r.cs):
            raise CXRError(f"head recipe cs must be positive numbers, not {r.cs}", where)
        from cxrscreen.models.feature_head import check_options
        from cxrscreen.models.registry import get_spec

        if get_spec(r.arch).library != "feature_head":
            raise CXRError(f"{r.arch} is not a feature-head architecture", where)
        check_options(r.model_options)
        return r

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> HeadRecipe:
        """A recipe from a YAML file (its `head:` block, or the whole file); non-None overrides win."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CXRError(f"cannot read head recipe ({exc})", path) from exc
        data = dict(data.get("head", data))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, path)


@dataclass
class FittedHead:
    """A fitted standardisation and linear head over the classes: mean/scale (D,), weight (C, D), bias (C,)."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    c: float
    cv: list[dict[str, float]]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, C) of raw features (N, D), as the torch model computes them."""
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight.T + self.bias


def fit_logistic(x: np.ndarray, y: np.ndarray, groups: Sequence[str], *, n_classes: int, cs: Sequence[float],
                 folds: int = 5, seed: int = 0, sample_weight: np.ndarray | None = None) -> FittedHead:
    """Standardise, choose C by grouped K-fold CV (held-out log-loss; whole split groups per fold), refit on all.

    Class weights are balanced. A class absent from `y` gets zero weights and a bias of ABSENT_CLASS_BIAS.
    CXRError when fewer than two classes are present. BLAS runs on one thread: these small matrices gain nothing
    from more, and on a loaded CPU OpenBLAS's waiting threads made a 1-second fit take over ten minutes.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_logistic(x, y, groups, n_classes=n_classes, cs=cs, folds=folds, seed=seed,
                             sample_weight=sample_weight)


def _fit_logistic(x: np.ndarray, y: np.ndarray, groups: Sequence[str], *, n_classes: int, cs: Sequence[float],
                  folds: int, seed: int, sample_weight: np.ndarray | None) -> FittedHead:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.model_selection import GroupKFold
    from sklearn.utils.class_weight import compute_sample_weight

    x = np.asarray(x, np.float64)
    y = np.asarray(y)
    present = np.unique(y)
    if len(present) < 2:
        raise CXRError(f"a head needs at least two classes to fit; the data hold only {present.tolist()}")
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-8] = 1.0
    z = (x - mean) / scale
    w = compute_sample_weight("balanced", y) * (1.0 if sample_weight is None else np.asarray(sample_weight))
    groups = np.asarray(groups)
    n_folds = min(folds, len(np.unique(groups)))
    cv: list[dict[str, float]] = []
    if len(cs) > 1 and n_folds >= 2:
        splits = list(GroupKFold(n_splits=n_folds).split(z, y, groups))
        for c in cs:
            losses = []
            for tr, te in splits:
                if len(np.unique(y[tr])) < len(present):
                    continue
                clf = _logreg(LogisticRegression, c, seed).fit(z[tr], y[tr], sample_weight=w[tr])
                losses.append(log_loss(y[te], clf.predict_proba(z[te]), labels=clf.classes_, sample_weight=w[te]))
            cv.append({"C": float(c), "cv_log_loss": float(np.mean(losses)) if losses else float("nan"),
                       "folds": len(losses)})
        scored = [r for r in cv if np.isfinite(r["cv_log_loss"])]
        best = min(scored, key=lambda r: r["cv_log_loss"])["C"] if scored else float(cs[0])
    else:
        best = float(cs[0])
    clf = _logreg(LogisticRegression, best, seed).fit(z, y, sample_weight=w)
    weight = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, ABSENT_CLASS_BIAS)
    coef, inter = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # sklearn's binary form: one row for the second class; split it symmetrically
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        inter = np.array([-inter[0] / 2, inter[0] / 2])
    for k, cls in enumerate(clf.classes_):
        weight[int(cls)] = coef[k]
        bias[int(cls)] = inter[k]
    return FittedHead(mean=mean, scale=scale, weight=weight, bias=bias, c=float(best), cv=cv)


def _logreg(cls: Any, c: float, seed: int) -> Any:
    return cls(C=float(c), max_iter=2000, random_state=seed)


def subset_features(cache: Any, data: SubsetData, stages: Sequence[str], progress: Callable[[int], None] | None = None
                    ) -> np.ndarray:
    """The chosen stages' cached features (N, D) of a loaded subset."""
    return cache.select_stages(cache.features(data.images, progress=progress), stages)


def keep_sources(data: SubsetData, sources: Sequence[str] | None, exclude: Sequence[str] = ()) -> np.ndarray:
    """Boolean mask of a subset's images whose source is in `sources` (None: any) and not in `exclude`."""
    src = np.asarray(data.sources)
    keep = np.ones(len(src), bool) if sources is None else np.isin(src, list(sources))
    return keep & ~np.isin(src, list(exclude))


def build_model(recipe: HeadRecipe, head: FittedHead, n_classes: int) -> Any:
    """The feature-head nn.Module of a recipe (ImageNet backbone) with the fitted head installed."""
    import torch

    from cxrscreen.models.registry import create_model

    model = create_model(recipe.arch, num_classes=n_classes, in_chans=1, weights="imagenet",
                         options=recipe.model_options)
    model.set_head(torch.from_numpy(head.mean), torch.from_numpy(head.scale), torch.from_numpy(head.weight),
                   torch.from_numpy(head.bias))
    return model.eval()


def write_head_run(out_dir: Path, recipe: HeadRecipe, head: FittedHead, *, classes: list[str],
                   data: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write model.safetensors and config.json of a fitted head; returns the config."""
    from cxrscreen.models.feature_head import cam_layer_for
    from cxrscreen.runs.run_dir import run_config, save_weights, write_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(recipe, head, len(classes))
    sha = save_weights(model, out_dir)
    config = run_config(
        kind="classifier", arch=recipe.arch, classes=classes, preprocess=recipe.preprocess,
        training={**recipe.to_dict(), "solver": "scikit-learn LogisticRegression (lbfgs), class_weight balanced",
                  "chosen_C": head.c, "cv": head.cv, "frozen": ["backbone"]},
        seed=recipe.seed, data=data,
        model_options=recipe.model_options, cam_layer=cam_layer_for(recipe.stages),
        parameters=int(sum(p.numel() for p in model.parameters())),
        trainable_parameters=int(head.weight.size + head.bias.size),
        frozen_backbone_parameters=int(sum(p.numel() for p in model.backbone.parameters())),
        finished=True, stop_reason="fitted by the solver (no epochs)", weights_sha256=sha, **(extra or {}),
    )
    write_config(out_dir, config)
    return config


def fit_head_run(recipe: HeadRecipe, data_dir: Path, split_csv: Path, out_dir: Path, *,
                 log: Callable[[str], None] = print, calibrate: bool = True,
                 progress_factory: Callable[[str, int], Any] | None = None) -> dict[str, Any]:
    """Fit `recipe` on the split's train images and write a calibrated run directory. Returns its config.

    Seconds are recorded: `feature_seconds` (extraction, 0 when every image was cached), `fit_seconds`.
    """
    import torch

    from cxrscreen.training.feature_cache import FeatureCache, cache_summary

    data_dir, split_csv, out_dir = Path(data_dir), Path(split_csv), Path(out_dir)
    torch.set_num_threads(recipe.threads)
    classes = list(CLASSES)
    t0 = time.monotonic()
    pre_cache = PreprocessedCache(recipe.preprocess, default_cache_dir())

    def bar(desc: str, total: int) -> Callable[[int], None] | None:
        b = progress_factory(desc, total) if progress_factory else None
        return None if b is None else b.update

    tr = load_subset(data_dir, split_csv, "train", pre_cache, classes)
    va = load_subset(data_dir, split_csv, "val", pre_cache, classes)
    keep = keep_sources(tr, recipe.sources, recipe.exclude_sources)
    if not keep.any():
        raise CXRError(f"no train images left after the source filter (sources {recipe.sources}, "
                       f"excluded {recipe.exclude_sources})", split_csv)
    cache = FeatureCache(recipe.arch, recipe.preprocess, flip=recipe.flip)
    t1 = time.monotonic()
    x = subset_features(cache, tr, recipe.stages, bar("features", len(tr.labels)))[keep]
    t2 = time.monotonic()
    y, groups = tr.labels[keep], np.asarray(tr.groups)[keep]
    log(f"fitting the head on {len(y)} images {np.bincount(y, minlength=len(classes)).tolist()} "
        f"({x.shape[1]} features; cache hits {cache.hits}, computed {cache.misses})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs convergence notes at the weakest penalties
        head = fit_logistic(x, y, groups, n_classes=len(classes), cs=recipe.cs, folds=recipe.cv_folds,
                            seed=recipe.seed)
    t3 = time.monotonic()
    log(f"chosen C = {head.c} (" + ", ".join(f"{r['C']}: {r['cv_log_loss']:.4f}" for r in head.cv) + ")")
    data = {"manifest": str(data_dir), "manifest_sha256": manifest_hash(data_dir), "split": str(split_csv),
            "split_sha256": file_sha256(split_csv), "train_images": int(keep.sum()), "val_images": int(len(va.labels)),
            "train_sources": sorted(set(np.asarray(tr.sources)[keep])), "skipped_files": {**tr.errors, **va.errors}}
    config = write_head_run(out_dir, recipe, head, classes=classes, data=data, extra={
        "feature_cache": cache_summary(cache), "load_seconds": round(t1 - t0, 1),
        "feature_seconds": round(t2 - t1, 1), "fit_seconds": round(t3 - t2, 1),
        "train_seconds": round(time.monotonic() - t0, 1)})
    from cxrscreen.runs.run_dir import read_config, write_config

    # what `cxrscreen adapt` replays so that a class a site lacks is not forgotten
    config["replay"] = write_replay(out_dir, x, y, np.asarray(tr.sources)[keep], seed=recipe.seed)
    write_config(out_dir, config)
    if calibrate and len(va.labels):
        from cxrscreen.evaluation.calibration import calibrate_run

        calibrate_run(out_dir, data_dir, split_csv)
        config = read_config(out_dir)
    log(f"wrote {out_dir}")
    return config
