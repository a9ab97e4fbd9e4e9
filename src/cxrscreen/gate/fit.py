"""Fitting the gate: ``fit_gate`` on given images, ``fit_gate_from_recipe`` on the data recipe of
``cxrscreen.gate.recipe``."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.gate import recipe
from cxrscreen.gate.features import FEATURE_VERSION, gate_features, rule_flags
from cxrscreen.gate.model import Gate, Logistic, Novelty
from cxrscreen.io.xray import XRay


def _folds(n: int, groups: list[str] | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """5 (train, test) index splits of the X-rays, grouped (no group on both sides) when groups are given."""
    from sklearn.model_selection import GroupKFold, KFold

    idx = np.arange(n)
    if groups is None:
        return list(KFold(5, shuffle=True, random_state=seed).split(idx))
    return list(GroupKFold(5, shuffle=True, random_state=seed).split(idx, groups=groups))


def fit_gate(
    real: list[XRay],
    other: list[XRay],
    *,
    seed: int = 0,
    groups: list[str] | None = None,
    c: float = 0.1,
    components: int = 2,
    reg_covar: float = 1e-2,
    real_accept: float = 0.997,
    colour_fraction: float = 0.10,
    info: dict[str, Any] | None = None,
) -> Gate:
    """Fit the gate on frontal chest X-rays (``real``) against other images (``other``).

    Images caught by a hard rule are left out of the fit. Logistic: class-balanced, L2 penalty ``1/c``,
    standardised on all fitting images. Novelty: a ``components``-Gaussian mixture (``reg_covar`` added to
    the covariances) on the X-rays' features standardised on the X-rays. Each threshold is the
    ``real_accept`` quantile of the X-rays' out-of-fold scores (5 folds, grouped by ``groups`` when given,
    shuffled with ``seed``; the other images are in every training fold).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.mixture import GaussianMixture

    xr = np.stack([gate_features(x) for x in real])
    kept = [x for x in other if not rule_flags(x, colour_fraction=colour_fraction)]
    xo = np.stack([gate_features(x) for x in kept])

    def fit_logistic(r: np.ndarray) -> Logistic:
        x = np.vstack([r, xo])
        y = np.r_[np.zeros(len(r)), np.ones(len(xo))]
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale < 1e-9] = 1.0
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=10000).fit((x - mean) / scale, y)
        return Logistic(mean, scale, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]))

    def fit_novelty(r: np.ndarray) -> Novelty:
        mean, scale = r.mean(axis=0), r.std(axis=0)
        scale[scale < 1e-9] = 1.0
        gm = GaussianMixture(components, covariance_type="full", reg_covar=reg_covar, random_state=seed)
        gm.fit((r - mean) / scale)
        return Novelty(mean, scale, gm.weights_.astype(np.float64), gm.means_.astype(np.float64),
                       gm.precisions_cholesky_.astype(np.float64))

    oof_p = np.zeros(len(xr))
    oof_n = np.zeros(len(xr))
    for tr, te in _folds(len(xr), groups, seed):
        oof_p[te] = fit_logistic(xr[tr])(xr[te])
        oof_n[te] = fit_novelty(xr[tr])(xr[te])
    p_thr = float(np.quantile(oof_p, real_accept))
    n_thr = float(np.quantile(oof_n, real_accept))
    logistic, novelty = fit_logistic(xr), fit_novelty(xr)
    p_other = logistic(xo)
    summary = {
        "fitted": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seed": seed,
        "logistic_C": c,
        "mixture_components": components,
        "mixture_reg_covar": reg_covar,
        "real_accept_per_score": real_accept,
        "n_real": len(real),
        "n_other": len(other),
        "n_other_after_rules": len(kept),
        "oof_real_accepted": float(((oof_p <= p_thr) & (oof_n <= n_thr)).mean()),
        "in_sample_other_flagged": float(((p_other > p_thr) | (novelty(xo) > n_thr)).mean()),
    }
    summary.update(info or {})
    return Gate(logistic=logistic, novelty=novelty, p_threshold=p_thr, novelty_threshold=n_thr,
                colour_fraction=colour_fraction, info=summary)


def fit_gate_from_recipe(
    data_dir: Path,
    *,
    seed: int = 0,
    per_kind: int = 40,
    c: float = 0.1,
    components: int = 2,
    real_accept: float = 0.997,
    photometric: bool = True,
) -> Gate:
    """Fit the gate on the recipe of ``cxrscreen.gate.recipe``: the fit half of ``data_dir`` (with one
    photometric copy of each X-ray, in its original's group, when ``photometric``) against ``per_kind``
    generated images of each seen kind (written to a temporary folder and read back)."""
    rows = recipe.real_manifest(data_dir, "fit")
    real = recipe.read_real(data_dir, rows)
    groups = list(rows["split_group"])
    if photometric:  # one re-mapped copy per X-ray, in its original's group
        rng = np.random.default_rng(seed)
        real += [recipe.photometric_variant(x, rng) for x in real]
        groups += groups
    with tempfile.TemporaryDirectory(prefix="gate_fit_") as tmp:
        pairs = list(recipe.make_others(recipe.SEEN_KINDS, per_kind, Path(tmp), seed=seed, role="fit"))
        info = {
            "data": "real: ../shared/data/cxr rows whose md5(split_group) is even (the fit half); other: "
                    "generated and skimage.data kinds below, written as PNG/JPEG and read with read_xray "
                    "(scripts/fit_gate.py)",
            "real_per_source": {k: int(v) for k, v in rows["source"].value_counts().sort_index().items()},
            "real_images": len(rows),
            "real_photometric_copies": bool(photometric),
            "other_kinds": sorted(recipe.SEEN_KINDS),
            "other_per_kind": per_kind,
            "unseen_kinds_held_out": sorted(recipe.UNSEEN_KINDS),
            "feature_version": FEATURE_VERSION,
        }
        return fit_gate(real, [x for _, x in pairs], seed=seed, groups=groups,
                        c=c, components=components, real_accept=real_accept, info=info)
