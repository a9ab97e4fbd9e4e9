"""The data recipe of the "not a frontal chest X-ray" gate: real X-rays and the other image kinds.

- real: frontal chest X-rays of a manifest folder whose ``split_group`` md5 is even (the *fit half*;
  benchmarks/gate_ood.py evaluates on the odd half), each also with a random gamma / contrast / stretch
  re-mapping (as another scanner, DICOM window or export gives), so that grey-level mapping alone does not flag;
- other: images generated here (noise, blank, gradients, shapes, text documents, a CT-like axial slice)
  and scikit-image's bundled pictures (crops, rotations, rescales, grey or colour), written as PNG/JPEG
  files to a folder and decoded with ``cxrscreen.io.xray.read_xray`` exactly like real input.

Nothing is downloaded. Some kinds are never used for fitting (``UNSEEN_*``): the benchmark reports them
separately. ``cxrscreen.gate.fit.fit_gate_from_recipe`` fits on this recipe (scripts/fit_gate.py).
"""

from __future__ import annotations

import functools
import hashlib
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from cxrscreen.io.xray import XRay, read_xray

Array = np.ndarray
Generator = Callable[[np.random.Generator], Array]

# --------------------------------------------------------------------------------------------- real data


def split_half(group: str) -> str:
    """'fit' when the md5 of the split group is even, else 'eval' (stable, patient-grouped)."""
    return "fit" if int(hashlib.md5(str(group).encode()).hexdigest(), 16) % 2 == 0 else "eval"


def real_manifest(data_dir: Path, half: str | None = None) -> pd.DataFrame:
    """The manifest with a ``half`` column ('fit' / 'eval'); only ``half`` rows when given."""
    m = pd.read_csv(data_dir / "manifest.csv")
    m["half"] = m["split_group"].map(split_half)
    return m if half is None else m[m["half"] == half].reset_index(drop=True)


def read_real(data_dir: Path, rows: pd.DataFrame) -> list[XRay]:
    """Decode the manifest rows' images in place."""
    return [read_xray(data_dir / p) for p in rows["image"]]


def photometric_variant(x: XRay, rng: np.random.Generator) -> XRay:
    """The same X-ray with another grey mapping, as another scanner, window or export would give it:
    gamma 0.7-1.45 (40 %), reduced contrast and a shift (30 %), or a min-max stretch (30 %)."""
    px = x.pixels.astype(np.float64)
    r = rng.random()
    if r < 0.4:
        px = px ** np.exp(rng.uniform(np.log(0.7), np.log(1.45)))
    elif r < 0.7:
        a = rng.uniform(0.75, 1.0)
        px = a * px + rng.uniform(0.0, 1.0 - a)
    else:
        px = (px - px.min()) / max(float(np.ptp(px)), 1e-6)
    return XRay(pixels=np.clip(px, 0, 1).astype(np.float32), path=x.path, meta=dict(x.meta))


# ------------------------------------------------------------------------------------------ generators


def _size(rng: np.random.Generator, lo: int = 224, hi: int = 800) -> tuple[int, int]:
    """(h, w) with a chest-X-ray-like aspect (0.75..1.35)."""
    h = int(rng.integers(lo, hi))
    return h, int(np.clip(h * rng.uniform(0.75, 1.35), lo, 1.4 * hi))


def _u8(x: Array) -> Array:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _colourise(grey: Array, rng: np.random.Generator) -> Array:
    """Random per-channel affine colouring of a [0, 1] grey image -> (H, W, 3) in [0, 1]."""
    a = rng.uniform(0.2, 1.0, 3)
    b = rng.uniform(0.0, 0.6, 3)
    return np.clip(grey[..., None] * a + b * (1 - grey[..., None]) * rng.uniform(0, 1), 0, 1)


def gen_uniform_noise(rng: np.random.Generator) -> Array:
    h, w = _size(rng)
    shape = (h, w, 3) if rng.random() < 0.3 else (h, w)
    lo = rng.uniform(0, 0.5)
    return _u8(rng.uniform(lo, rng.uniform(lo + 0.2, 1.0), shape))


def gen_gaussian_noise(rng: np.random.Generator) -> Array:
    h, w = _size(rng)
    shape = (h, w, 3) if rng.random() < 0.3 else (h, w)
    return _u8(rng.normal(rng.uniform(0.2, 0.8), rng.uniform(0.03, 0.3), shape))


def gen_blank(rng: np.random.Generator) -> Array:
    h, w = _size(rng)
    v = float(rng.choice([0.0, 1.0, rng.uniform(0, 1)]))
    img = np.full((h, w), v)
    r = rng.random()
    if r < 0.3:
        img = img + rng.normal(0, rng.uniform(0.002, 0.01), (h, w))
    elif r < 0.5:
        img = img + np.linspace(0, rng.uniform(-0.03, 0.03), w)[None, :]
    return _u8(img)


def gen_gradient(rng: np.random.Generator) -> Array:
    h, w = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    ang = rng.uniform(0, 2 * np.pi)
    t = np.cos(ang) * xx + np.sin(ang) * yy
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    if rng.random() < 0.3:
        t = t ** rng.uniform(0.3, 3)
    g = rng.uniform(0, 0.4) + t * rng.uniform(0.2, 0.6)
    return _u8(_colourise(g, rng) if rng.random() < 0.3 else g)


def gen_shapes(rng: np.random.Generator) -> Array:
    h, w = _size(rng)
    colour = rng.random() < 0.4
    img = np.full((h, w, 3) if colour else (h, w), rng.uniform(0, 1))
    for _ in range(int(rng.integers(4, 30))):
        c = tuple(float(v) for v in rng.uniform(0, 1, 3)) if colour else float(rng.uniform(0, 1))
        shape = rng.integers(0, 4)
        p = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        thick = -1 if rng.random() < 0.6 else int(rng.integers(1, 8))
        if shape == 0:
            cv2.rectangle(img, p, (int(rng.integers(0, w)), int(rng.integers(0, h))), c, thick)
        elif shape == 1:
            cv2.circle(img, p, int(rng.integers(5, max(h, w) // 3)), c, thick)
        elif shape == 2:
            cv2.line(img, p, (int(rng.integers(0, w)), int(rng.integers(0, h))), c, int(rng.integers(1, 10)))
        else:
            pts = rng.integers(0, [w, h], size=(int(rng.integers(3, 7)), 2)).astype(np.int32)
            cv2.fillPoly(img, [pts], c)
    return _u8(img)


def _words(rng: np.random.Generator, n: int) -> str:
    letters = string.ascii_letters + "0123456789"
    return " ".join("".join(rng.choice(list(letters), int(rng.integers(1, 10)))) for _ in range(n))


def gen_document(rng: np.random.Generator) -> Array:
    """A text page: lines of random words on a light background, sometimes with rules, shading, tilt."""
    h = int(rng.integers(400, 1000))
    w = int(h * rng.uniform(0.7, 1.0))
    img = np.full((h, w), int(rng.integers(200, 256)), np.uint8)  # cv2.putText draws on uint8 only
    font = int(rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX,
                           cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX]))
    scale = rng.uniform(0.4, 1.2) * h / 700
    step = int(max(10, 32 * scale))
    margin = int(rng.uniform(0.04, 0.12) * w)
    ink = int(rng.integers(0, 80))
    y = margin + step
    while y < h - margin:
        if rng.random() < 0.1:
            y += step  # paragraph break
        elif rng.random() < 0.05:
            cv2.line(img, (margin, y), (w - margin, y), ink, 1)
        else:
            cv2.putText(img, _words(rng, int(rng.integers(2, 14))), (margin, y), font, scale, ink,
                        int(rng.integers(1, 3)), cv2.LINE_AA)
        y += step
    img = img / 255.0
    if rng.random() < 0.4:  # photographed page: uneven light
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = img * (1 - rng.uniform(0.1, 0.4) * ((xx - rng.uniform()) ** 2 + (yy - rng.uniform()) ** 2))
    if rng.random() < 0.5:
        m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-4, 4), 1.0)
        img = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    return _u8(img)


def gen_ct_slice(rng: np.random.Generator) -> Array:
    """A synthetic axial chest CT slice: round field of view on black, body ellipse, dark lungs with
    vessels, mediastinum, bright vertebra and table; lung or soft-tissue window."""
    n = int(rng.choice([256, 512, 512, 768]))
    img = np.zeros((n, n))
    c = n / 2
    fov = np.zeros((n, n), np.uint8)
    cv2.circle(fov, (int(c), int(c)), int(n * 0.49), 1, -1)
    air = rng.uniform(0.0, 0.08)
    img[fov > 0] = air
    lung_window = rng.random() < 0.5
    soft = rng.uniform(0.75, 0.95) if lung_window else rng.uniform(0.4, 0.6)
    fat = soft - rng.uniform(0.05, 0.15)
    lung = rng.uniform(0.1, 0.3) if lung_window else rng.uniform(0.0, 0.05)
    bone = 1.0 if lung_window else rng.uniform(0.85, 1.0)
    bw, bh = n * rng.uniform(0.36, 0.46), n * rng.uniform(0.25, 0.33)
    cy = c + rng.uniform(-0.05, 0.05) * n
    cv2.ellipse(img, (int(c), int(cy)), (int(bw), int(bh)), 0, 0, 360, fat, -1)
    cv2.ellipse(img, (int(c), int(cy)), (int(bw * 0.93), int(bh * 0.9)), 0, 0, 360, soft, -1)
    for side in (-1, 1):
        lx = c + side * bw * rng.uniform(0.42, 0.52)
        cv2.ellipse(img, (int(lx), int(cy - bh * 0.05)), (int(bw * rng.uniform(0.3, 0.4)),
                    int(bh * rng.uniform(0.6, 0.75))), rng.uniform(-15, 15), 0, 360, lung, -1)
        for _ in range(int(rng.integers(10, 40))):  # vessels
            vx = int(lx + rng.normal(0, bw * 0.15))
            vy = int(cy + rng.normal(0, bh * 0.3))
            cv2.circle(img, (vx, vy), int(rng.integers(1, max(2, n // 100))), soft * 0.9, -1)
    cv2.ellipse(img, (int(c + bw * 0.1), int(cy - bh * 0.1)), (int(bw * 0.25), int(bh * 0.35)), 20, 0, 360,
                soft * rng.uniform(0.95, 1.05), -1)  # heart
    cv2.circle(img, (int(c), int(cy + bh * 0.6)), int(bh * 0.18), bone, -1)  # vertebral body
    cv2.circle(img, (int(c), int(cy + bh * 0.6)), int(bh * 0.11), bone * 0.8, -1)
    cv2.line(img, (int(c), int(cy + bh * 0.7)), (int(c), int(cy + bh * 0.92)), bone, max(2, n // 60))
    cv2.ellipse(img, (int(c), int(cy - bh * 0.85)), (int(bw * 0.08), int(bh * 0.05)), 0, 0, 360, bone, -1)
    if rng.random() < 0.7:  # table
        ty = int(cy + bh * 1.12)
        cv2.ellipse(img, (int(c), ty + n // 3), (int(n * 0.45), n // 3), 0, 200, 340, 0.6, max(2, n // 80))
    img = cv2.GaussianBlur(img, (0, 0), n / 400) + rng.normal(0, rng.uniform(0.005, 0.03), (n, n))
    img[fov == 0] = 0.0
    return _u8(img)


def gen_smooth_noise(rng: np.random.Generator) -> Array:
    h, w = _size(rng)
    img = cv2.GaussianBlur(rng.normal(0, 1, (h, w)), (0, 0), rng.uniform(3, 40))
    img = (img - img.min()) / (np.ptp(img) + 1e-9)
    return _u8(_colourise(img, rng) if rng.random() < 0.3 else img)


def gen_stripes(rng: np.random.Generator) -> Array:
    h, w = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w]
    ang = rng.uniform(0, np.pi)
    f = rng.uniform(0.005, 0.15)
    img = 0.5 + 0.5 * rng.uniform(0.2, 1) * np.sin(2 * np.pi * f * (np.cos(ang) * xx + np.sin(ang) * yy))
    return _u8(img)


def gen_checkers(rng: np.random.Generator) -> Array:
    h, w = _size(rng)
    k = int(rng.integers(8, 80))
    yy, xx = np.mgrid[0:h, 0:w]
    img = (((yy // k) + (xx // k)) % 2).astype(float) * rng.uniform(0.3, 1) + rng.uniform(0, 0.3)
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(0, 90), 1.0)
    img = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)
    return _u8(cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 3)))


def _rgb(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    r, g, b = (int(v) for v in rng.integers(lo, hi, 3))
    return r, g, b


def gen_screenshot(rng: np.random.Generator) -> Array:
    """A software screen: title bar, grey panels, buttons and text."""
    h, w = _size(rng, 300, 900)
    colour = rng.random() < 0.5
    img = np.full((h, w, 3), int(rng.integers(190, 245)), np.uint8)  # cv2.putText draws on uint8 only
    cv2.rectangle(img, (0, 0), (w, int(h * 0.06)), _rgb(rng, 25, 150), -1)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(int(h * 0.08), h - 30))
        x1 = min(w - 1, x0 + int(rng.integers(40, w // 2)))
        y1 = min(h - 1, y0 + int(rng.integers(20, h // 3)))
        cv2.rectangle(img, (x0, y0), (x1, y1), _rgb(rng, 128, 256), -1)
        cv2.rectangle(img, (x0, y0), (x1, y1), (80, 80, 80), 1)
        cv2.putText(img, _words(rng, 2), (x0 + 4, y0 + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return img if colour else np.rint(img.mean(axis=2)).astype(np.uint8)


def gen_lateral_like(rng: np.random.Generator) -> Array:
    """A crude lateral chest view: body filling the frame, one large lung field, a vertebral column of
    bright blocks along the back, the heart in front low down, the diaphragm, arms raised in front.

    Only a proxy (no rib fans, no real anatomy): a real lateral film may still pass the model.
    """
    h = int(rng.integers(300, 800))
    w = int(h * rng.uniform(0.8, 1.05))
    img = np.full((h, w), rng.uniform(0.0, 0.1))
    body = rng.uniform(0.55, 0.75)
    cv2.ellipse(img, (int(w * 0.5), int(h * 0.55)), (int(w * 0.42), int(h * 0.6)), 0, 0, 360, body, -1)
    lung = body - rng.uniform(0.25, 0.4)
    cv2.ellipse(img, (int(w * 0.5), int(h * 0.45)), (int(w * 0.27), int(h * 0.32)), rng.uniform(-10, 10),
                0, 360, lung, -1)
    heart = body * rng.uniform(0.9, 1.05)
    cv2.ellipse(img, (int(w * 0.38), int(h * 0.62)), (int(w * 0.16), int(h * 0.14)), 30, 0, 360, heart, -1)
    cv2.ellipse(img, (int(w * 0.5), int(h * 0.95)), (int(w * 0.4), int(h * 0.2)), 0, 180, 360,
                body * 1.05, -1)  # diaphragm / abdomen
    spine_x = w * rng.uniform(0.7, 0.78)
    nb = int(rng.integers(10, 16))
    for i in range(nb):
        y = int(h * (0.05 + 0.9 * i / nb))
        x = int(spine_x + w * 0.03 * np.sin(i / nb * np.pi))
        cv2.rectangle(img, (x - int(w * 0.05), y), (x + int(w * 0.05), y + int(h * 0.9 / nb) - 3),
                      min(1.0, body * 1.3), -1)
    cv2.line(img, (int(w * 0.12), int(h * 0.2)), (int(w * 0.14), int(h * 0.7)), min(1.0, body * 1.25),
             max(2, w // 60))  # sternum
    for _ in range(2):  # raised arms
        cv2.ellipse(img, (int(w * rng.uniform(0.3, 0.5)), int(h * 0.08)), (int(w * 0.08), int(h * 0.2)),
                    rng.uniform(-30, 30), 0, 360, body * 1.1, -1)
    img = cv2.GaussianBlur(img, (0, 0), max(1.0, h / 150)) + rng.normal(0, 0.02, (h, w))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return _u8(img)


# -------------------------------------------------------------------------------- stock scikit-image


def _skimage_image(name: str, rng: np.random.Generator) -> Array:
    """One bundled scikit-image picture as uint8 (H, W) or (H, W, 3); no download."""
    from skimage import data

    img = getattr(data, name)()
    if name == "lfw_subset":  # 200 faces / non-faces of 25 x 25
        img = img[int(rng.integers(0, len(img)))]
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 4:  # alpha: composite on white
        a = img[..., 3:] / 255.0
        img = img[..., :3] * a + 255 * (1 - a)
    if img.dtype == bool:
        img = img.astype(np.float64)
    if img.dtype.kind == "f":
        img = (img - img.min()) / (np.ptp(img) + 1e-9) * 255
    return np.clip(img, 0, 255).astype(np.uint8)


def variant(img: Array, rng: np.random.Generator) -> Array:
    """A random crop (50-100 % per side), quarter turn / small rotation, flip, rescale and (for colour
    pictures, 40 %) grey conversion of a picture."""
    h, w = img.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = img[y0:y0 + ch, x0:x0 + cw]
    img = np.rot90(img, int(rng.choice([0, 0, 1, 2, 3])))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if rng.random() < 0.3:
        hh, ww = img.shape[:2]
        m = cv2.getRotationMatrix2D((ww / 2, hh / 2), rng.uniform(-20, 20), 1.0)
        img = cv2.warpAffine(np.ascontiguousarray(img), m, (ww, hh), borderMode=cv2.BORDER_REFLECT)
    if img.ndim == 3 and rng.random() < 0.4:
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("L"))
    long_side = int(rng.integers(224, 800))
    f = long_side / max(img.shape[:2])
    size = (max(8, int(img.shape[1] * f)), max(8, int(img.shape[0] * f)))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(img), size, interpolation=interp)


PYDICOM_SCANS = ("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "examples_rgb_color.dcm",
                 "examples_palette.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "JPEG2000.dcm")


@functools.cache
def _pydicom_scans() -> tuple[Array, ...]:
    """CT, MR, ultrasound and nuclear-medicine images shipped in pydicom's wheel (no download), as uint8."""
    from pydicom.data import get_testdata_file

    out = []
    for name in PYDICOM_SCANS:
        path = get_testdata_file(name, download=False)
        if path is not None:
            out.append(_u8(read_xray(path).pixels))
    return tuple(out)


def gen_pydicom_scan(rng: np.random.Generator) -> Array:
    """A variant of a real CT / MR / US / NM image, re-encoded without its DICOM tags (as an export)."""
    scans = _pydicom_scans()
    return variant(scans[int(rng.integers(0, len(scans)))], rng)


def _skimage_gen(name: str) -> Generator:
    def gen(rng: np.random.Generator) -> Array:
        return variant(_skimage_image(name, rng), rng)

    gen.__name__ = f"skimage_{name}"
    return gen


SEEN_SYNTH: dict[str, Generator] = {
    "uniform_noise": gen_uniform_noise, "gaussian_noise": gen_gaussian_noise, "blank": gen_blank,
    "gradient": gen_gradient, "shapes": gen_shapes, "document": gen_document, "ct_slice": gen_ct_slice,
}
UNSEEN_SYNTH: dict[str, Generator] = {
    "smooth_noise": gen_smooth_noise, "stripes": gen_stripes, "checkers": gen_checkers,
    "screenshot": gen_screenshot, "lateral_like": gen_lateral_like,
    "pydicom_scan": gen_pydicom_scan,
}
SEEN_SKIMAGE = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "page", "text", "horse",
                "brick", "grass", "hubble_deep_field", "immunohistochemistry", "checkerboard")
UNSEEN_SKIMAGE = ("moon", "clock", "gravel", "retina", "cell", "binary_blobs", "colorwheel", "logo",
                  "microaneurysms", "shepp_logan_phantom", "lfw_subset")

SEEN_KINDS: dict[str, Generator] = {**SEEN_SYNTH, **{f"skimage:{n}": _skimage_gen(n) for n in SEEN_SKIMAGE}}
UNSEEN_KINDS: dict[str, Generator] = {
    **UNSEEN_SYNTH, **{f"skimage:{n}": _skimage_gen(n) for n in UNSEEN_SKIMAGE}
}


def _kind_seed(kind: str, seed: int, role: str) -> np.random.Generator:
    """Independent streams per kind and role ('fit' / 'eval'), stable across runs."""
    key = int(hashlib.md5(f"{kind}|{role}|{seed}".encode()).hexdigest()[:8], 16)
    return np.random.default_rng(key)


def write_image(arr: Array, path_stem: Path, rng: np.random.Generator) -> Path:
    """Save as PNG or JPEG (quality 70-95), as an encoder of a real upload would."""
    img = Image.fromarray(np.ascontiguousarray(arr))
    if rng.random() < 0.5:
        path = path_stem.with_suffix(".png")
        img.save(path)
    else:
        path = path_stem.with_suffix(".jpg")
        img.save(path, quality=int(rng.integers(70, 96)))
    return path


def make_others(kinds: dict[str, Generator], n: int, folder: Path, *, seed: int = 0,
                role: str = "fit") -> Iterator[tuple[str, XRay]]:
    """(kind, decoded image) for ``n`` images of each kind, written under ``folder`` and read back."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, gen in kinds.items():
        rng = _kind_seed(kind, seed, role)
        for i in range(n):
            stem = folder / f"{kind.replace(':', '_')}_{role}_{i:03d}"
            yield kind, read_xray(write_image(gen(rng), stem, rng))
