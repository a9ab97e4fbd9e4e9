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
3. Opt-in (``lungs_rule``; `cxrscreen predict --lung-check`): the bundled lung segmenter must find two lungs,
   each covering at least ``min_lung_fraction`` of the image, else "two lungs of plausible size not found".
   Off by default: it adds a segmentation per image. ``scripts/lung_gate_check.py`` counts what it refuses
   among the real X-rays of ../shared that the rest of the gate accepts.

Colour. :func:`cxrscreen.io.xray.read_xray` converts colour to grey, and a colour *mode* says little: many
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
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.gate.features import (
    FEATURE_NAMES,
    FEATURE_VERSION,
    MAX_LANDSCAPE,
    MAX_PORTRAIT,
    MIN_GREY_LEVELS,
    gate_features,
    rule_flags,
)
from cxrscreen.io.xray import XRay

SQUEEZE_MIN_ASPECT = 1.5
"""Landscape images wider than this (width / height) are tested for a sideways squeeze."""
SQUEEZE_NOVELTY_DROP = 20.0
"""A landscape image whose novelty falls by more than this when made square is flagged as squeezed.
Chosen on 31 real X-rays of ../shared/data/cxr squeezed to 512 x 220 (they fall by 22.8 to 107) and the 8
real images of the set wider than 1.5 (-34 to 18.7): a narrow margin. On 200 squeezed X-rays
(`benchmarks/gate_squeeze.py --n 200`, docs/results/gate_squeeze.json) 195 are caught."""
SQUEEZE_MIN_PORTRAIT = 1.4
"""Portrait images taller than this (height / width) are tested for a squeeze from the sides. No real X-ray
of ../shared reaches it (height / width at most 1.333 in cxr and external, 1.225 in lesions, 1.0 in siim,
measured on the manifests' stored and original sizes), so no real film of the set is ever tested."""
SQUEEZE_PORTRAIT_DROP = 10.0
"""A portrait image (taller than SQUEEZE_MIN_PORTRAIT) whose novelty falls by more than this when made square
is flagged as squeezed. Chosen on 100 real X-rays of ../shared/data/cxr squeezed to 300 x 512 (94 of them fall
by more than 10; 20 would catch 85); lower than the landscape limit because the aspect test alone already keeps
every real film out. On another 200, disjoint, 191 are refused; of the 7,655 real X-rays of ../shared cxr and siim
none is refused as squeezed (`benchmarks/gate_squeeze.py --n 200`, docs/results/gate_squeeze.json, "portrait").
The measure does not tell a squeeze from a genuinely tall crop of a film (176 of 200 such crops are refused too)."""

"""Changes whenever :func:`gate_features` changes; a gate fitted on another version is refused."""

GATE_FILE = "gate.json"
MIN_LUNG_FRACTION = 0.02
"""The opt-in lungs rule: each segmented lung must cover at least this share of the image (see
scripts/lung_gate_check.py for what it refuses among ../shared's X-rays)."""
"""Blank image: the 1st-99th percentile range of the (128 px) grey values is below this."""
"""Outer rows / columns with a grey std below this are cut as padding before the features."""
"""Fewer distinct 8-bit grey levels than this (in the decoded image, before any reduction; DICOM: distinct
stored values), or a 1-bit file, is flagged: a bilevel or posterised picture has lost the densities the
model reads. The real X-rays of ../shared/data/cxr (3,078 when measured, 2,989 now) have at least 108 levels
(median 248)."""
"""Height / width above this is flagged (squeezed or a strip). Real X-rays: at most 1.33 (3:4 portrait);
chest film is 14 x 17 in (1.21). 2.0 leaves 50 % margin and catches an X-ray squeezed to 220 x 512 (2.33)."""
"""Width / height above this is flagged. Real X-rays reach 2.24 (web figures of a wide bedside film), so
landscape gets a looser limit than portrait: a landscape squeeze below 3.0 is left to the fitted scores."""
"""One name per entry of :func:`gate_features` (see its docstring for the definitions)."""


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
    lungs_rule: bool = False
    min_lung_fraction: float = MIN_LUNG_FRACTION

    def lung_flags(self, xray: XRay) -> list[str]:
        """The lungs rule alone: [] when two lungs of at least `min_lung_fraction` of the image are found."""
        return self.lung_flags_many([xray])[0]

    def lung_flags_many(self, xrays: list[XRay]) -> list[list[str]]:
        """The lungs rule for several X-rays, segmented as one batch (the bundled segmenter)."""
        from cxrscreen.lungs.segmenter import bundled_segmenter

        seg = bundled_segmenter()
        pixels = [x.pixels for x in xrays]
        many = getattr(seg, "segment_many", None)
        found = many(pixels) if many is not None else [seg.segment(p) for p in pixels]
        out = []
        for res in found:
            fr = res.fractions
            out.append([] if min(fr.values()) >= self.min_lung_fraction else [
                f"two lungs of plausible size not found (right {100 * fr['right']:.1f} %, left "
                f"{100 * fr['left']:.1f} % of the image; each needs {100 * self.min_lung_fraction:.0f} %)"])
        return out

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

    def flags(self, xray: XRay) -> list[str]:
        """Reasons to withhold a diagnosis; [] for an input that looks like a frontal chest X-ray.

        The gate works on the decoded image, whose borders, geometry and grey levels the model's cropping
        and CLAHE would hide.
        """
        out = self.flags_before_lungs(xray)
        if not out and self.lungs_rule:
            out += self.lung_flags(xray)
        return out

    def flags_before_lungs(self, xray: XRay) -> list[str]:
        """Every rule but the lungs rule (hard rules, fitted scores, squeeze)."""
        out = self.rules(xray)
        if out:
            return out
        sc = self.scores(xray)
        if sc["p"] > self.p_threshold:
            out.append(f"not a frontal chest X-ray (score {sc['p']:.2f})")
        if sc["novelty"] > self.novelty_threshold:
            out.append(f"unlike the frontal chest X-rays the gate knows (novelty {sc['novelty']:.0f} > "
                       f"limit {self.novelty_threshold:.0f})")
        drop = self.squeeze_drop(xray, sc["novelty"])
        h, w = np.asarray(xray.pixels).shape[:2]
        limit = SQUEEZE_NOVELTY_DROP if w > h else SQUEEZE_PORTRAIT_DROP
        if drop is not None and drop > limit:
            how = "sideways" if w > h else "from the sides"
            out.append(f"looks squeezed {how}: {w}x{h} made square is far more like a chest X-ray (novelty "
                       f"falls by {drop:.0f} > {limit:g}); resend the image at its true shape")
        return out

    def flags_many(self, xrays: list[XRay]) -> list[list[str]]:
        """`flags` of several X-rays; the lungs rule (when on) segments those that pass the rest as one batch."""
        out = [self.flags_before_lungs(x) for x in xrays]
        if not self.lungs_rule:
            return out
        todo = [i for i, f in enumerate(out) if not f]
        for i, f in zip(todo, self.lung_flags_many([xrays[i] for i in todo]), strict=True):
            out[i] = f
        return out

    def squeeze_drop(self, xray: XRay, novelty: float | None = None) -> float | None:
        """For a landscape image (width > SQUEEZE_MIN_ASPECT x height) or a tall portrait one (height >
        SQUEEZE_MIN_PORTRAIT x width): its novelty minus the novelty of the same image resized to a square
        of side = its height; None for other shapes. A chest X-ray squeezed (sideways or from the sides)
        becomes a plausible chest again when made square (its novelty falls); a genuinely wide film does not."""
        px = np.asarray(xray.pixels, dtype=np.float32)
        h, w = px.shape[:2]
        if w <= SQUEEZE_MIN_ASPECT * h and h <= SQUEEZE_MIN_PORTRAIT * w:
            return None
        import cv2

        if novelty is None:
            novelty = self.scores(xray)["novelty"]
        square = cv2.resize(px, (h, h), interpolation=cv2.INTER_AREA)
        meta = {k: v for k, v in (xray.meta or {}).items() if not k.startswith("original_")}
        return float(novelty) - float(self.novelty(gate_features(XRay(square, xray.path, meta))))

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
            "lungs_rule": bool(self.lungs_rule),
            "min_lung_fraction": float(self.min_lung_fraction),
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
        if (d.get("kind"), d.get("format")) != ("cxrscreen-gate", 1):  # the file's format tag
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
                       max_landscape=float(d.get("max_landscape", MAX_LANDSCAPE)),
                       lungs_rule=bool(d.get("lungs_rule", False)),
                       min_lung_fraction=float(d.get("min_lung_fraction", MIN_LUNG_FRACTION)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed gate file ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> Gate:
        """Load a gate written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def bundled_gate_path() -> Path | None:
    """The package's ``weights/gate.json``, or None when it is not installed."""
    ref = resources.files("cxrscreen") / "weights" / GATE_FILE
    return Path(str(ref)) if ref.is_file() else None


def gate_for_run(run: Any) -> Gate | None:
    """The gate for a loaded run: ``<run_dir>/gate.json``, else the bundled one, else None.

    CXRError (naming the file) when the chosen file is unreadable, malformed or of another feature version.
    A run loaded from an ONNX export uses the gate stored in that file (`predict.onnx_engine.OnnxLoadedRun`).
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

