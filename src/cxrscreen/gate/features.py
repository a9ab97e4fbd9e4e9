"""The gate's features and rules: what a decoded image looks like (histogram, symmetry, profiles, edges,
bands, aspect) and the rules that flag it before any model (DICOM modality and view, colour, grey levels,
blank frames, odd aspect ratios)."""

from __future__ import annotations

import re

import cv2
import numpy as np

from cxrscreen.io.xray import XRay

FEATURE_VERSION = "gate-features-v1"

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

# Words of a DICOM BodyPartExamined (defined terms, and the free text scanners write) that name a part other
# than the chest; a value holding any chest word is never flagged ("CHEST SPINE" stays a chest).
NON_CHEST_PARTS = frozenset({
    "HEAD", "SKULL", "BRAIN", "FACE", "JAW", "TMJ", "SINUS", "ORBIT", "NOSE", "EAR", "NECK", "CSPINE", "LSPINE",
    "SSPINE", "SACRUM", "COCCYX", "LUMBAR", "CERVICAL", "ABDOMEN", "PELVIS", "HIP", "KNEE", "FOOT", "ANKLE",
    "HEEL", "TOE", "HAND", "FINGER", "THUMB", "WRIST", "ELBOW", "FOREARM", "ARM", "HUMERUS", "SHOULDER",
    "LEG", "FEMUR", "TIBIA", "FIBULA", "PATELLA", "EXTREMITY", "BREAST", "KIDNEY", "BLADDER", "DENTAL",
    "TEETH", "TOOTH",
})
CHEST_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "PECHO", "POITRINE", "TORACE",
                         "RIBS", "CHESTABDOMEN", "THORAXABDOMEN", "HEART"})

BLANK_RANGE = 0.05
BORDER_STD = 0.02
MIN_GREY_LEVELS = 16
MAX_PORTRAIT = 2.0
MAX_LANDSCAPE = 3.0

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
    views = [v.strip() for v in view.split("\\") if v.strip()]
    if len(set(views)) > 1:
        out.append(f"ambiguous view: DICOM ViewPosition has several values ({view}); one frontal (PA or AP) "
                   "view is screened")
    elif view in NON_FRONTAL_VIEWS:
        out.append(f"not a frontal view: DICOM ViewPosition is {view} ({NON_FRONTAL_VIEWS[view]})")
    part = str(meta.get("body_part") or "").strip().upper()
    words = set(re.split(r"[^A-Z]+", part)) - {""}
    if words & NON_CHEST_PARTS and not words & CHEST_PARTS:
        out.append(f"not a chest radiograph: DICOM BodyPartExamined is {part}")
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

