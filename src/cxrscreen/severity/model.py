"""The severity regressor: ridge regression of each score on standardised pooled backbone features.

The ridge penalty of each score is chosen by an inner K-fold grouped by split_group, on the training
images only (so a cross-validation around ``fit`` stays nested). Saved as ``severity.safetensors``
(standardisation and coefficients, float32, a few KB) and ``severity.json`` (the feature spec, the
penalties, the training data and, once measured, the cross-validated figures) beside the model weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from safetensors.numpy import load_file, save_file

from cxrscreen.errors import CXRError
from cxrscreen.io.files import write_json
from cxrscreen.severity.features import FeatureSpec
from cxrscreen.severity.info import CONFIG_FILE, severity_info  # noqa: F401  (re-exported)
from cxrscreen.severity.scores import TARGET_RANGES, TARGETS

WEIGHTS_FILE = "severity.safetensors"
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-2, 5, 22))


def group_folds(groups: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per item: groups shuffled by `seed`, each whole group to the smallest fold."""
    uniq, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    if len(uniq) < k:
        raise CXRError(f"{len(uniq)} groups cannot make {k} folds")
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of, sizes = np.zeros(len(uniq), np.int64), np.zeros(k, np.int64)
    for g in order[np.argsort(-counts[order], kind="stable")]:
        f = int(np.argmin(sizes))
        fold_of[g] = f
        sizes[f] += counts[g]
    return fold_of[inverse]


def ridge_path(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Ridge coefficients for every penalty at once (SVD): (A, D, T) coefficients and (A, T) intercepts."""
    xm, ym = x.mean(0), y.mean(0)
    u, s, vt = np.linalg.svd(x - xm, full_matrices=False)
    uty = u.T @ (y - ym)
    coefs = np.stack([vt.T @ ((s / (s**2 + a))[:, None] * uty) for a in alphas])
    return coefs, ym[None, :] - np.einsum("d,adt->at", xm, coefs)


def clip_scores(pred: np.ndarray) -> np.ndarray:
    """(N, 2) predictions clipped to each score's range."""
    lo = np.array([TARGET_RANGES[t][0] for t in TARGETS])
    hi = np.array([TARGET_RANGES[t][1] for t in TARGETS])
    return np.clip(pred, lo, hi)


@dataclass
class SeverityRegressor:
    """Standardisation (mean, scale: (D,)), coefficients (2, D) on standardised features, intercepts (2,)."""

    spec: FeatureSpec
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    alphas: list[float]
    block_dims: list[int]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, groups: Sequence[str], spec: FeatureSpec, block_dims: Sequence[int],
            *, alphas: Sequence[float] = DEFAULT_ALPHAS, inner_k: int = 5, seed: int = 0) -> SeverityRegressor:
        """Fit on pooled features x (N, D) and scores y (N, 2); each score's penalty by inner grouped CV."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if len(spec.regions) * sum(block_dims) != x.shape[1]:
            raise CXRError(f"feature width {x.shape[1]} is not {len(spec.regions)} region(s) x the sum of the block "
                           f"widths {list(block_dims)}")
        mean = x.mean(0)
        scale = x.std(0)
        scale[scale < 1e-8] = 1.0
        z = (x - mean) / scale
        k = min(inner_k, len(set(groups)))
        folds = group_folds(groups, k, seed)
        err = np.zeros((len(alphas), y.shape[1]))
        for f in range(k):
            tr, te = folds != f, folds == f
            c, b = ridge_path(z[tr], y[tr], alphas)
            pred = np.einsum("nd,adt->ant", z[te], c) + b[:, None, :]
            err += np.abs(clip_scores(pred) - y[te][None]).sum(1)
        best = err.argmin(0)
        c, b = ridge_path(z, y, alphas)
        coef = np.stack([c[best[t], :, t] for t in range(y.shape[1])])
        intercept = np.array([b[best[t], t] for t in range(y.shape[1])])
        return cls(spec, mean, scale, coef, intercept, [float(alphas[i]) for i in best], list(block_dims),
                   {"n_train": int(len(y)), "n_groups": int(len(set(groups))), "inner_k": k, "alpha_grid": list(alphas),
                    "inner_mae": {t: float(err[best[i], i] / len(y)) for i, t in enumerate(TARGETS)}})

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        """(N, 2) unclipped predictions of pooled features x (N, D)."""
        return ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, 2) geographic extent (0-8) and opacity (0-6), clipped to their ranges."""
        return clip_scores(self.predict_raw(x))

    def spatial_map(self, maps: Sequence[np.ndarray], size: int,
                    regions: Sequence[tuple[float, float, float, float]] | None = None,
                    weights: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """(2, size, size) per-position contribution maps of one image's feature maps [(C, h, w) per stage]
        and its pooling regions (boxes in model pixels, as ``FeatureExtractor.regions``; None: the whole image)
        or, for "lung_masks" pooling, its regions' weight maps (S, S) on the model grid
        (``FeatureExtractor.lung_weights``): each cell's contribution is scaled by its weight over the region's
        mean weight, so M's mean over the region's cells is again that region's part of the prediction.

        The prediction is intercept + sum over regions and stages of coef . (region mean of map - mean) / scale,
        so with ``M = intercept + sum over regions of [inside the region] coef . (map - mean) / scale`` (each
        stage's map resized bilinearly to size x size) the prediction is intercept + the sum over regions of
        M's mean over the region minus the intercept; one whole-image region: M averages to the (unclipped)
        prediction.
        """
        from cxrscreen.severity.features import region_cells

        boxes: list[Any] = list(weights) if weights is not None else list(regions) if regions is not None else [
            (0.0, 0.0, float(size), float(size))]
        width = sum(self.block_dims)
        if len(boxes) * width != len(self.mean):
            raise CXRError(f"{len(boxes)} region(s) do not fit the regressor's {len(self.mean)} features")
        out = np.tile(self.intercept[:, None, None], (1, size, size)).astype(np.float64)
        for r, box in enumerate(boxes):
            start = r * width
            for m, d in zip(maps, self.block_dims, strict=True):
                sl = slice(start, start + d)
                start += d
                z = (m.astype(np.float64) - self.mean[sl, None, None]) / self.scale[sl, None, None]
                contrib = np.einsum("td,dhw->thw", self.coef[:, sl], z)
                if weights is not None:
                    cell = cv2.resize(np.asarray(box, np.float32), (m.shape[2], m.shape[1]),
                                      interpolation=cv2.INTER_AREA).astype(np.float64)
                    inside = cell > 0
                    contrib = contrib * (cell * inside.sum() / max(float(cell.sum()), 1e-12))
                elif regions is not None:
                    mask = np.zeros(m.shape[1:])
                    mask[region_cells(box, m.shape[1:], size)] = 1.0
                    contrib = contrib * mask
                for t in range(contrib.shape[0]):
                    out[t] += cv2.resize(contrib[t].astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        return out

    def save(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write severity.safetensors and severity.json into out_dir; returns the JSON's path."""
        from cxrscreen.io.files import file_sha256

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept}
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(out / WEIGHTS_FILE))
        cfg = {"targets": list(TARGETS), "ranges": {t: list(TARGET_RANGES[t]) for t in TARGETS},
               "regressor": "ridge on standardised region-averaged features", "features": self.spec.to_dict(),
               "block_dims": self.block_dims, "alphas": dict(zip(TARGETS, self.alphas, strict=True)),
               "weights_sha256": file_sha256(out / WEIGHTS_FILE), **self.meta, **(extra or {})}
        write_json(out / CONFIG_FILE, cfg)
        return out / CONFIG_FILE

    @classmethod
    def load(cls, folder: str | Path) -> SeverityRegressor:
        """Read a saved regressor; CXRError when it is missing, corrupt or replaced."""
        from cxrscreen.io.files import read_checked_bundle

        cfg, wpath = read_checked_bundle(Path(folder), CONFIG_FILE, WEIGHTS_FILE, "severity regressor",
                                         require_checksum=False)
        t = load_file(str(wpath))
        meta = {k: v for k, v in cfg.items() if k not in ("features", "block_dims", "alphas")}
        return cls(FeatureSpec.from_dict(cfg["features"]), t["mean"].astype(np.float64),
                   t["scale"].astype(np.float64), t["coef"].astype(np.float64), t["intercept"].astype(np.float64),
                   [float(cfg["alphas"][k]) for k in TARGETS], list(cfg["block_dims"]), meta)
