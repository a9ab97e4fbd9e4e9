"""Input gate: refuse a diagnosis for images that are not frontal chest X-rays.

Two layers, applied in order by :meth:`Gate.flags`:

1. Hard rules with specific messages (no fitting): DICOM ``Modality`` of another kind of study (CT, MR,
   ultrasound, ...), DICOM ``ViewPosition`` lateral or oblique, a blank (constant or near-constant)
   image, a bilevel image or one of very few grey levels (:data:`MIN_GREY_LEVELS`), an extreme aspect
   ratio (:data:`MAX_PORTRAIT`, :data:`MAX_LANDSCAPE`), and a colour picture (saturated colour measured in
   the decoded samples, see below).
2. Two fitted scores on a compact grey-level feature vector (:func:`gate_features`, 71 numbers), either
   of which flags the input (``scripts/fit_gate.py`` fits them):

   - a logistic regression, real frontal chest X-rays against generated and stock non-X-ray images:
     P(not a frontal chest X-ray). It knows the kinds it was shown (noise, documents, photos, CT slices);
   - a novelty score: the negative log-likelihood under a 2-component Gaussian mixture fitted on the
     X-rays alone. It flags what is unlike any X-ray, including kinds never shown to the logistic
     regression (on the benchmark it lifts unseen kinds from ~84 % to ~98 % flagged).

   Each threshold is set so that 99.7 % of the fitting X-rays (out of fold) pass it.

Colour. :func:`cxrscreen.io.read_xray` converts colour to grey, and a colour *mode* says little: many
chest X-rays on the web are grey pictures saved as RGB JPEGs. The reader therefore measures saturation in
the decoded colour samples (``meta["colour"]``, see :func:`colour_stats`), for files and uploaded bytes
alike; the gate never opens a file, and ``xray.path`` (for an upload, the name the client sent) is a label
only. It is a hard rule, not a model feature: every training X-ray is stored grey, so a colour feature
would separate the classes perfectly and the model would learn "RGB file => not an X-ray". Colour DICOMs
get no colour evidence and rely on the grey model alone.

The fitted parameters live in JSON (``weights/gate.json`` in the package, or ``gate.json`` in a run
directory); :func:`gate_for_run` picks one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.io import XRay

__all__ = [
    "FEATURE_NAMES",
    "FEATURE_VERSION",
    "Gate",
    "Logistic",
    "Novelty",
    "colour_stats",
    "fit_gate",
    "gate_features",
    "gate_for_run",
    "grey_levels",
    "rule_flags",
]

FEATURE_VERSION = "gate-features-v1"
"""Changes whenever :func:`gate_features` changes; a gate fitted on another version is refused."""

GATE_FILE = "gate.json"

# DICOM Modality values that are never a chest radiograph (CR, DX, RG, and OT/SC exports pass).
NON_RADIOGRAPH_MODALITIES: dict[str, str] = {
    "CT": "CT", "MR": "MR", "PT": "PET", "NM": "nuclear medicine", "US": "ultrasound",
    "MG": "mammography", "XA": "angiography", "RF": "fluoroscopy", "IO": "intra-oral X-ray",
    "PX": "panoramic dental X-ray", "DG": "dental X-ray", "OP": "ophthalmic photograph",
    "OPT": "ophthalmic tomography", "SM": "slide microscopy", "XC": "external camera photograph",
    "ES": "endoscopy", "GM": "microscopy", "ECG": "ECG", "SEG": "segmentation", "RTDOSE": "RT dose",
    "RTIMAGE": "RT portal image", "BMD": "bone densitometry", "OCT": "optical coherence tomography",
}
# DICOM ViewPosition values that are not a frontal (PA / AP) projection.
NON_FRONTAL_VIEWS: dict[str, str] = {
    "LL": "lateral", "RL": "lateral", "LAT": "lateral", "LATERAL": "lateral", "LLAT": "lateral",
    "RLAT": "lateral", "RLO": "oblique", "LLO": "oblique", "RAO": "oblique", "LAO": "oblique",
}

BLANK_RANGE = 0.05
"""Blank image: the 1st-99th percentile range of the (128 px) grey values is below this."""
BORDER_STD = 0.02
"""Outer rows / columns with a grey std below this are cut as padding before the features."""
MIN_GREY_LEVELS = 16
"""Fewer distinct 8-bit grey levels than this (in the decoded image, before any reduction; DICOM: distinct
stored values), or a 1-bit file, is flagged: a bilevel or posterised picture has lost the densities the
model reads. The 3,078 real X-rays of ../shared/data/cxr have at least 108 levels (median 248)."""
MAX_PORTRAIT = 2.0
"""Height / width above this is flagged (squeezed or a strip). Real X-rays: at most 1.33 (3:4 portrait);
chest film is 14 x 17 in (1.21). 2.0 leaves 50 % margin and catches an X-ray squeezed to 220 x 512 (2.33)."""
MAX_LANDSCAPE = 3.0
"""Width / height above this is flagged. Real X-rays reach 2.24 (web figures of a wide bedside film), so
landscape gets a looser limit than portrait: a landscape squeeze below 3.0 is left to the fitted scores."""

_N_HIST = 16
_N_PROF = 8
_GRID = 4
_BAND_SIGMAS = (1.0, 2.0, 4.0, 8.0)


def _feature_names() -> tuple[str, ...]:
    names = [f"hist{i:02d}" for i in range(_N_HIST)]
    names += ["mean", "std", "p05", "p50", "p95", "frac_black", "frac_white", "entropy", "top2_bins"]
    names += ["sym_lr", "sym_ud", "sym_lr_minus_ud"]
    names += [f"col{i}" for i in range(_N_PROF)] + [f"row{i}" for i in range(_N_PROF)]
    names += [f"grid{r}{c}" for r in range(_GRID) for c in range(_GRID)]
    names += ["centre_minus_border", "edge_density", "mean_grad", "lap_energy", "fine_residual",
              "flat_blocks"]
    names += [f"band{i}" for i in range(len(_BAND_SIGMAS))]
    names += ["log_aspect"]
    return tuple(names)


FEATURE_NAMES: tuple[str, ...] = _feature_names()
"""One name per entry of :func:`gate_features` (see its docstring for the definitions)."""


# ------------------------------------------------------------------------------------------- features


def _trim(pixels: np.ndarray) -> np.ndarray:
    """Cut uniform outer rows and columns (padding, bars, scanner margins): every row / column outside
    the first and last whose grey std exceeds BORDER_STD. Kept whole when less than 30 % would remain."""
    h, w = pixels.shape
    step = max(1, max(h, w) // 256)
    small = pixels[::step, ::step]
    rows = np.flatnonzero(small.std(axis=1) > BORDER_STD)
    cols = np.flatnonzero(small.std(axis=0) > BORDER_STD)
    if rows.size == 0 or cols.size == 0:
        return pixels
    r0, r1 = rows[0] * step, min(h, (rows[-1] + 1) * step)
    c0, c1 = cols[0] * step, min(w, (cols[-1] + 1) * step)
    if r1 - r0 < 0.3 * h or c1 - c0 < 0.3 * w:
        return pixels
    return pixels[r0:r1, c0:c1]


def _square(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre square of the short side of the trimmed image at 128 px, log(width / height) after
    trimming)."""
    px = _trim(np.asarray(pixels, dtype=np.float32))
    h, w = px.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    sq = np.ascontiguousarray(px[top:top + s, left:left + s])
    g = cv2.resize(sq, (128, 128), interpolation=cv2.INTER_AREA if s >= 128 else cv2.INTER_LINEAR)
    return g, float(np.log(w / h))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is (near) constant."""
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    den = float(np.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / den if den > 1e-8 else 0.0


def gate_features(xray: XRay) -> np.ndarray:
    """Feature vector (float64, len(FEATURE_NAMES)) of one decoded image, version FEATURE_VERSION.

    Uniform outer rows / columns (padding, bars) are cut first; then the centre square (short side) is
    resized to 128 px (``g``) and 64 px (``s``):

    - ``hist00..15``: fraction of ``g`` pixels in 16 equal grey bins of [0, 1];
    - ``mean, std, p05, p50, p95`` of ``g``; ``frac_black`` (< 0.04), ``frac_white`` (> 0.96);
      ``entropy`` of a 64-bin histogram / 6 bits; ``top2_bins``: mass of its two fullest bins
      (documents, drawings, binary images);
    - ``sym_lr``, ``sym_ud``: correlation of ``s`` with its left-right / up-down mirror, and their
      difference (a frontal chest is left-right, not up-down, symmetric);
    - ``col0..7``, ``row0..7``: mean of 8 column / row bands of ``s`` minus the image mean (dark lungs
      either side of a bright mediastinum; bright abdomen at the bottom);
    - ``grid00..33``: 4x4 block means of ``s`` minus the image mean (the coarse layout);
    - ``centre_minus_border``: mean of the central half of ``s`` minus its outer 8-pixel ring;
    - ``edge_density``: fraction of ``s`` pixels whose Sobel gradient exceeds 0.05 per pixel;
      ``mean_grad``: its mean; ``lap_energy``: mean |Laplacian| of ``g``; ``fine_residual``: std of
      ``g`` minus its Gaussian blur (sigma 1.5): noise and fine texture; ``flat_blocks``: fraction of
      8x8 blocks of ``g`` with std < 0.01 (flat areas: drawings, screens, padding);
    - ``band0..3``: log10 std of ``g`` in 4 octave bands (differences of Gaussian blurs, sigma 1-2-4-8 px
      apart): the spectrum, from noise (fine) to gradients and blur (coarse);
    - ``log_aspect``: log(width / height) after trimming.
    """
    return features_from_square(*_square(xray.pixels))


def features_from_square(g: np.ndarray, log_aspect: float) -> np.ndarray:
    """:func:`gate_features` from the 128 px centre square ``g`` and log(width / height)."""
    g = np.asarray(g, dtype=np.float32)
    s = cv2.resize(g, (64, 64), interpolation=cv2.INTER_AREA)
    n = g.size
    hist = np.histogram(g, bins=_N_HIST, range=(0.0, 1.0))[0] / n
    h64 = np.histogram(g, bins=64, range=(0.0, 1.0))[0] / n
    nz = h64[h64 > 0]
    entropy = float(-(nz * np.log2(nz)).sum()) / 6.0
    top2 = float(np.sort(h64)[-2:].sum())
    mean = float(g.mean())
    p05, p50, p95 = (float(v) for v in np.percentile(g, [5, 50, 95]))

    sym_lr = _corr(s, s[:, ::-1])
    sym_ud = _corr(s, s[::-1, :])
    cols = s.mean(axis=0).reshape(_N_PROF, -1).mean(axis=1) - mean
    rows = s.mean(axis=1).reshape(_N_PROF, -1).mean(axis=1) - mean
    k = 64 // _GRID
    grid = s.reshape(_GRID, k, _GRID, k).mean(axis=(1, 3)).ravel() - mean
    ring = np.ones_like(s, dtype=bool)
    ring[8:-8, 8:-8] = False
    centre_minus_border = float(s[16:48, 16:48].mean() - s[ring].mean())

    gx = cv2.Sobel(s, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    gy = cv2.Sobel(s, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    grad = np.sqrt(gx * gx + gy * gy)
    lap = float(np.abs(cv2.Laplacian(g, cv2.CV_32F, ksize=1)).mean())
    fine = float((g - cv2.GaussianBlur(g, (0, 0), 1.5)).std())
    flat = float((g.reshape(16, 8, 16, 8).std(axis=(1, 3)) < 0.01).mean())
    blurred = [g] + [cv2.GaussianBlur(g, (0, 0), sg, borderType=cv2.BORDER_REFLECT) for sg in _BAND_SIGMAS]
    bands = [float(np.log10((a - b).std() + 1e-4)) for a, b in zip(blurred[:-1], blurred[1:], strict=True)]
    feats = [
        *hist, mean, float(g.std()), p05, p50, p95, float((g < 0.04).mean()), float((g > 0.96).mean()),
        entropy, top2, sym_lr, sym_ud, sym_lr - sym_ud, *cols, *rows, *grid, centre_minus_border,
        float((grad > 0.05).mean()), float(grad.mean()), lap, fine, flat, *bands, log_aspect,
    ]
    out = np.asarray(feats, dtype=np.float64)
    if out.shape != (len(FEATURE_NAMES),):  # pragma: no cover - guards edits to the list above
        raise AssertionError(f"gate_features: {out.shape} != {len(FEATURE_NAMES)} names")
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def colour_stats(xray: XRay) -> tuple[float, float] | None:
    """(mean chroma, fraction of strongly coloured pixels) of a colour image, or None for grey ones.

    Measured by the reader on the decoded samples (``meta["colour"]``: chroma is max(R,G,B) - min(R,G,B)
    on [0, 1] on a thumbnail of at most 128 px, strongly coloured above ``cxrscreen.io.CHROMA_STRONG``), so that the
    evidence comes from the bytes, never from a file named like ``xray.path``. A grey picture saved as
    RGB has chroma ~0.
    """
    colour = (xray.meta or {}).get("colour")
    if not colour:
        return None
    return float(colour["mean_chroma"]), float(colour["strong_fraction"])


def grey_levels(xray: XRay) -> int:
    """Distinct 8-bit grey levels of the image: the reader's count (``meta["grey_levels"]``, taken before any
    reduction), else counted on a subsample of ``pixels``."""
    levels = (xray.meta or {}).get("grey_levels")
    if levels is not None:
        return int(levels)
    px = np.asarray(xray.pixels)
    step = max(1, int(np.ceil(np.sqrt(px.size / 262_144))))
    q = np.rint(np.clip(px[::step, ::step], 0.0, 1.0) * 255.0).astype(np.int64)
    return int((np.bincount(q.ravel(), minlength=256) > 0).sum())


# ------------------------------------------------------------------------------------------------ rules


def rule_flags(xray: XRay, *, colour_fraction: float | None = None, min_grey_levels: int = MIN_GREY_LEVELS,
               max_portrait: float = MAX_PORTRAIT, max_landscape: float = MAX_LANDSCAPE) -> list[str]:
    """Flags from the hard rules (DICOM tags, blank, bilevel / few grey levels, aspect ratio, colour); []
    when none applies.

    ``colour_fraction``: flag a colour picture when more than this fraction of its pixels is strongly
    coloured (None: no colour rule).
    """
    meta = xray.meta or {}
    out: list[str] = []
    modality = str(meta.get("modality") or "").strip().upper()
    if modality in NON_RADIOGRAPH_MODALITIES:
        out.append(f"not a chest radiograph: DICOM Modality is {modality} "
                   f"({NON_RADIOGRAPH_MODALITIES[modality]})")
    view = str(meta.get("view_position") or "").strip().upper()
    if view in NON_FRONTAL_VIEWS:
        out.append(f"not a frontal view: DICOM ViewPosition is {view} ({NON_FRONTAL_VIEWS[view]})")
    g = cv2.resize(np.asarray(xray.pixels, dtype=np.float32), (128, 128), interpolation=cv2.INTER_AREA)
    lo, hi = np.percentile(g, [1, 99])
    if hi - lo < BLANK_RANGE:
        out.append(f"blank image (grey values span only {hi - lo:.3f})")
        return out  # a blank image has few grey levels: one reason is enough
    levels = grey_levels(xray)
    if meta.get("bits") == 1 or levels <= 2:
        out.append("bilevel (black and white) image: the grey levels of an X-ray are lost")
    elif levels < min_grey_levels:
        out.append(f"only {levels} grey levels (an X-ray has at least {min_grey_levels}): "
                   "posterised or a drawing")
    h, w = np.asarray(xray.pixels).shape[:2]
    h0, w0 = int(meta.get("original_height") or h), int(meta.get("original_width") or w)
    if h0 > max_portrait * w0:
        out.append(f"extreme aspect ratio: {w0}x{h0} is {h0 / w0:.2f} times taller than wide "
                   f"(limit {max_portrait:g}): squeezed, cropped or not a chest X-ray")
    elif w0 > max_landscape * h0:
        out.append(f"extreme aspect ratio: {w0}x{h0} is {w0 / h0:.2f} times wider than tall "
                   f"(limit {max_landscape:g}): squeezed, cropped or not a chest X-ray")
    if colour_fraction is not None:
        stats = colour_stats(xray)
        if stats is not None and stats[1] > colour_fraction:
            out.append(f"colour picture, not an X-ray ({100 * stats[1]:.0f} % of pixels strongly coloured)")
    return out


# ------------------------------------------------------------------------------------------------- gate


def _as_list(a: np.ndarray) -> list[Any]:
    return np.asarray(a, dtype=np.float64).tolist()


@dataclass
class Logistic:
    """Discriminative part: P(not a frontal chest X-ray) = sigmoid(coef . (x - mean) / scale + intercept),
    trained on X-rays against known kinds of other images."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        z = (np.asarray(feats, dtype=np.float64) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-np.clip(z @ self.coef + self.intercept, -50.0, 50.0)))


@dataclass
class Novelty:
    """One-class part: negative log-likelihood of the standardised features under a Gaussian mixture
    (full covariances) fitted on X-rays only; it flags images unlike any X-ray, of kinds never seen."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, F)
    prec_chol: np.ndarray  # (K, F, F): precision_k = prec_chol_k @ prec_chol_k.T (sklearn's convention)

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(np.asarray(feats, dtype=np.float64)) - self.mean) / self.scale
        n_feat = z.shape[1]
        logp = []
        for w, m, pc in zip(self.weights, self.means, self.prec_chol, strict=True):
            y = (z - m) @ pc
            logdet = float(np.log(np.diag(pc)).sum())
            logp.append(np.log(w) + logdet - 0.5 * (n_feat * np.log(2 * np.pi) + (y * y).sum(axis=1)))
        lp = np.stack(logp, axis=1)
        top = lp.max(axis=1)
        nll = -(top + np.log(np.exp(lp - top[:, None]).sum(axis=1)))
        return nll if np.ndim(feats) > 1 else nll[0]


@dataclass
class Gate:
    """A fitted gate: hard rules, then two scores on :func:`gate_features`.

    - ``p`` = :class:`Logistic` P(not a frontal chest X-ray); flagged when above ``p_threshold``;
    - ``novelty`` = :class:`Novelty` negative log-likelihood under the X-rays' feature distribution
      (higher = more unusual; it can be negative); flagged when above ``novelty_threshold``.

    Each threshold is the ``real_accept`` quantile of out-of-fold scores of the fitting X-rays.
    """

    logistic: Logistic
    novelty: Novelty
    p_threshold: float
    novelty_threshold: float
    colour_fraction: float = 0.10
    feature_version: str = FEATURE_VERSION
    info: dict[str, Any] = field(default_factory=dict)
    min_grey_levels: int = MIN_GREY_LEVELS
    max_portrait: float = MAX_PORTRAIT
    max_landscape: float = MAX_LANDSCAPE

    def rules(self, xray: XRay) -> list[str]:
        """The hard rules with this gate's parameters."""
        return rule_flags(xray, colour_fraction=self.colour_fraction, min_grey_levels=self.min_grey_levels,
                          max_portrait=self.max_portrait, max_landscape=self.max_landscape)

    def score_features(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P(not a frontal chest X-ray), novelty) for features of shape (F,) or (N, F)."""
        return self.logistic(feats), self.novelty(feats)

    def scores(self, xray: XRay) -> dict[str, float]:
        """The model scores of one image (hard rules not applied): ``p`` and ``novelty``."""
        p, nov = self.score_features(gate_features(xray))
        return {"p": float(p), "novelty": float(nov)}

    def flags(self, xray: XRay, image_u8: np.ndarray | None = None) -> list[str]:
        """Reasons to withhold a diagnosis; [] for an input that looks like a frontal chest X-ray.

        ``image_u8`` (the model's preprocessed square) is accepted for the predictor's interface; the gate
        works on the decoded image, whose borders, geometry and grey levels cropping and CLAHE would hide.
        """
        out = self.rules(xray)
        if out:
            return out
        sc = self.scores(xray)
        if sc["p"] > self.p_threshold:
            out.append(f"not a frontal chest X-ray (score {sc['p']:.2f})")
        if sc["novelty"] > self.novelty_threshold:
            out.append(f"unlike the frontal chest X-rays the gate knows (novelty {sc['novelty']:.0f} > "
                       f"limit {self.novelty_threshold:.0f})")
        return out

    # -- persistence

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (floats written exactly)."""
        lg, nv = self.logistic, self.novelty
        return {
            "kind": "cxrscreen-gate",
            "format": 1,
            "feature_version": self.feature_version,
            "feature_names": list(FEATURE_NAMES),
            "p_threshold": float(self.p_threshold),
            "novelty_threshold": float(self.novelty_threshold),
            "colour_fraction": float(self.colour_fraction),
            "min_grey_levels": int(self.min_grey_levels),
            "max_portrait": float(self.max_portrait),
            "max_landscape": float(self.max_landscape),
            "info": self.info,
            "logistic": {"mean": _as_list(lg.mean), "scale": _as_list(lg.scale), "coef": _as_list(lg.coef),
                         "intercept": float(lg.intercept)},
            "novelty": {"mean": _as_list(nv.mean), "scale": _as_list(nv.scale),
                        "weights": _as_list(nv.weights), "means": _as_list(nv.means),
                        "prec_chol": _as_list(nv.prec_chol)},
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The gate as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), separators=(",", ":"))
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gate:
        """Inverse of :meth:`to_dict`; ValueError for another feature version or a malformed file."""
        if d.get("kind") != "cxrscreen-gate" or d.get("format") != 1:
            raise ValueError("not a cxrscreen gate file (format 1)")
        if d.get("feature_version") != FEATURE_VERSION:
            raise ValueError(f"gate fitted on features {d.get('feature_version')!r}, "
                             f"this code computes {FEATURE_VERSION!r}: refit it (scripts/fit_gate.py)")
        n = len(FEATURE_NAMES)
        try:
            lg, nv = d["logistic"], d["novelty"]
            logistic = Logistic(*(np.asarray(lg[k], dtype=np.float64) for k in ("mean", "scale", "coef")),
                                intercept=float(lg["intercept"]))
            novelty = Novelty(*(np.asarray(nv[k], dtype=np.float64)
                                for k in ("mean", "scale", "weights", "means", "prec_chol")))
            k = novelty.weights.shape[0]
            shapes_ok = (
                all(a.shape == (n,) for a in (logistic.mean, logistic.scale, logistic.coef, novelty.mean,
                                               novelty.scale))
                and novelty.means.shape == (k, n) and novelty.prec_chol.shape == (k, n, n)
            )
            if not shapes_ok:
                raise ValueError("gate parameters do not match the feature vector length")
            return cls(logistic=logistic, novelty=novelty, p_threshold=float(d["p_threshold"]),
                       novelty_threshold=float(d["novelty_threshold"]),
                       colour_fraction=float(d.get("colour_fraction", 0.10)),
                       feature_version=d["feature_version"], info=dict(d.get("info") or {}),
                       min_grey_levels=int(d.get("min_grey_levels", MIN_GREY_LEVELS)),
                       max_portrait=float(d.get("max_portrait", MAX_PORTRAIT)),
                       max_landscape=float(d.get("max_landscape", MAX_LANDSCAPE)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed gate file ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> Gate:
        """Load a gate written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


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


def bundled_gate_path() -> Path | None:
    """The package's ``weights/gate.json``, or None when it is not installed."""
    ref = resources.files("cxrscreen") / "weights" / GATE_FILE
    return Path(str(ref)) if ref.is_file() else None


def gate_for_run(run: Any) -> Gate | None:
    """The gate for a loaded run: ``<run_dir>/gate.json``, else the bundled one, else None.

    CXRError (naming the file) when the chosen file is unreadable, malformed or of another feature version.
    A run loaded from an ONNX export uses the gate stored in that file (`onnx_engine.OnnxLoadedRun`).
    """
    if getattr(run, "embedded_gate", None) is not None:
        return run.embedded_gate
    run_dir = getattr(run, "run_dir", None)
    candidates = [Path(run_dir) / GATE_FILE] if run_dir is not None else []
    bundled = bundled_gate_path()
    if bundled is not None:
        candidates.append(bundled)
    for path in candidates:
        if path.is_file():
            try:
                return Gate.from_json(path)
            except (ValueError, OSError) as exc:  # a broken gate must not be skipped silently
                raise CXRError(f"cannot load the input gate ({exc})", path) from exc
    return None
