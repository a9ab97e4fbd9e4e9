"""Read one chest X-ray image file (PNG, JPEG, TIFF, BMP or DICOM) into a float32 array in [0, 1].

This is the only module in the project that opens image files. Every failure on bad input is a
:class:`~cxrscreen.errors.CXRError` whose message names the file and the problem.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrscreen.errors import CXRError

MAX_PIXELS: int = 50_000_000
"""Largest image (width * height) decoded: checked from the header before any pixel is decoded (a guard
against decompression bombs; cxrscreen's own limit, quoted in the error message)."""

MAX_FILE_BYTES: int = 256 * 1024 * 1024
"""Largest image file read (checked with fstat before any byte is read): a sparse multi-gigabyte file or
a device is refused instead of being read whole into memory."""

MAX_DECODED_BYTES: int = 150_000_000
"""Largest decoded image in bytes (width * height * bytes per pixel as the decoder stores it: 1 for 8-bit
grey, 2 for 16-bit, 3 for RGB, 4 for RGBA, CMYK, 32-bit integer and float), checked from the header before
any pixel is decoded. 150 MB admits a 7000 x 7000 RGB image and any 16-bit image under `MAX_PIXELS`; a
32-bit or CMYK image up to about 6100 x 6100."""

CHROMA_STRONG = 0.25
"""A pixel is 'strongly coloured' when max(R,G,B) - min(R,G,B) exceeds this (on [0, 1])."""

SUPPORTED_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
"""File suffixes (lower case) that callers walking folders should pick up; files without a suffix
may also be DICOM (see :func:`is_supported_file`)."""

_DICOM_SUFFIXES = (".dcm", ".dicom")
_PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # Pillow opens multi-picture (MPO) JPEGs through "JPEG"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)  # ITU-R BT.601, as PIL's own "L" conversion

# Transfer syntax UID -> what to install so pydicom can decode it.
_PYLIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg"
_JPEGLS = "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg)"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg"
_DECODER_HINTS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _PYLIBJPEG,  # JPEG Baseline (Pillow can also decode it)
    "1.2.840.10008.1.2.4.51": _PYLIBJPEG,  # JPEG Extended
    "1.2.840.10008.1.2.4.57": _PYLIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _PYLIBJPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _JPEGLS,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _JPEGLS,  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",  # RLE Lossless
}
_FALLBACK_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


@dataclass
class XRay:
    """One decoded image: ``pixels`` is float32, shape (H, W), in [0, 1], 0 = black (air)."""

    pixels: np.ndarray
    path: str
    meta: dict[str, Any] = field(default_factory=dict)
    dicom: Any = None  # a DICOM input's io.dicom_identity.DicomIdentity (UIDs + header), else None


def read_xray(path: str | Path, *, max_pixels: int = MAX_PIXELS, max_side: int | None = None,
              max_bytes: int = MAX_FILE_BYTES, max_decoded_bytes: int = MAX_DECODED_BYTES) -> XRay:
    """Read an image file (format sniffed from its content) into an :class:`XRay`.

    ``max_side``: reduce while decoding so that the long side is at most this many pixels (JPEG through
    the codec's own 1/2..1/8 scaling, then area interpolation); ``meta`` then records ``original_width``
    and ``original_height``. None (default) keeps the full resolution.
    ``max_decoded_bytes``: the largest decoded image (see `MAX_DECODED_BYTES`), checked from the header.
    ``max_bytes``: the largest file read (only regular files are read: a FIFO or a device is refused
    without blocking on it).
    Raises CXRError for a missing, empty, truncated, unsupported or oversized file.
    """
    name = str(path)
    return _decode(read_image_file(path, max_bytes=max_bytes), name, max_pixels, max_side, max_decoded_bytes)


_FILE_KINDS = ((stat.S_ISDIR, "is a directory, not an image file"),
               (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file; only regular files are read"),
               (stat.S_ISCHR, "is a character device, not a regular file; only regular files are read"),
               (stat.S_ISBLK, "is a block device, not a regular file; only regular files are read"),
               (stat.S_ISSOCK, "is a socket, not a regular file; only regular files are read"))


def read_image_file(path: str | Path, *, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes.

    The file is opened without blocking (a FIFO never hangs the caller) and checked with fstat (the very
    file opened: no race with a rename) before anything is read; at most ``max_bytes`` bytes are read even
    if it grows meanwhile. CXRError naming the file: missing, a directory, FIFO, device or socket, or
    over the limit.
    """
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise CXRError("file not found", name) from exc
    except IsADirectoryError as exc:
        raise CXRError("is a directory, not an image file", name) from exc
    except OSError as exc:
        raise CXRError(f"cannot read file ({exc.strerror or exc})", name) from exc
    try:
        st = os.fstat(fd)
        for test, problem in _FILE_KINDS:
            if test(st.st_mode):
                raise CXRError(problem, name)
        if not stat.S_ISREG(st.st_mode):
            raise CXRError("is not a regular file; only regular files are read", name)
        if st.st_size > max_bytes:
            raise CXRError(f"file is {st.st_size:,} bytes, over the limit of {max_bytes:,} bytes for one image",
                           name)
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 22))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise CXRError(f"file grew past the limit of {max_bytes:,} bytes while being read", name)
        return b"".join(chunks)
    except CXRError:
        raise
    except IsADirectoryError as exc:
        raise CXRError("is a directory, not an image file", name) from exc
    except OSError as exc:
        raise CXRError(f"cannot read file ({exc.strerror or exc})", name) from exc
    finally:
        os.close(fd)


def read_xray_bytes(data: bytes, *, name: str = "<upload>", max_pixels: int = MAX_PIXELS,
                    max_side: int | None = None, max_decoded_bytes: int = MAX_DECODED_BYTES) -> XRay:
    """Decode an image held in memory (e.g. a web upload); ``name`` is a label used in errors and as
    ``path``, never opened. ``max_side`` as in :func:`read_xray`."""
    return _decode(bytes(data), name, max_pixels, max_side, max_decoded_bytes)


def decoded_bytes_estimate(data: bytes) -> int | None:
    """Bytes the image in ``data`` takes once decoded at full size, read from its header alone (nothing is
    decoded; a deflated DICOM, whose header sits inside the compressed stream, is not inflated); None when
    the header does not say (not an image, a deflated DICOM)."""
    try:
        if _is_dicom_header(data):
            import pydicom

            fp = io.BytesIO(data)
            meta = pydicom.filereader.read_file_meta_info(fp)
            if str(meta.get("TransferSyntaxUID", "")) == "1.2.840.10008.1.2.1.99":  # Deflated Explicit VR LE
                return None
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            per_pixel = max(1, int(ds.get("SamplesPerPixel") or 1) * int(ds.get("BitsAllocated") or 16) // 8)
            return int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * per_pixel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(_PIL_FORMATS)) as img:
                return img.size[0] * img.size[1] * _pil_pixel_bytes(img.mode)
    except Exception:  # noqa: BLE001 (no readable header: the decoder will say why)
        return None


def is_supported_file(path: str | Path) -> bool:
    """True if ``path`` has a supported suffix, or has no suffix and starts like a DICOM file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix:
        return suffix in SUPPORTED_SUFFIXES
    return has_dicom_magic(p)


def has_dicom_magic(path: str | Path) -> bool:
    """True if ``path`` is a regular file whose bytes 128..131 read 'DICM' (never blocks on a FIFO)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            return _is_dicom_header(fh.read(132))
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- internals


def _is_dicom_header(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _decode(data: bytes, name: str, max_pixels: int, max_side: int | None = None,
            max_decoded_bytes: int = MAX_DECODED_BYTES) -> XRay:
    """Dispatch on the content (DICOM preamble, else Pillow), wrapping every library error."""
    if len(data) == 0:
        raise CXRError("empty file (0 bytes)", name)
    suffix = Path(name).suffix.lower()
    try:
        if _is_dicom_header(data):
            return _decode_dicom(data, name, max_pixels, force=False, max_side=max_side,
                                 max_decoded_bytes=max_decoded_bytes)
        try:
            return _decode_pil(data, name, max_pixels, max_side, max_decoded_bytes)
        except UnidentifiedImageError:
            if suffix in _DICOM_SUFFIXES:  # DICOM written without the 128-byte preamble
                return _decode_dicom(data, name, max_pixels, force=True, max_side=max_side,
                                     max_decoded_bytes=max_decoded_bytes)
            raise CXRError(
                "not a recognised image file (expected PNG, JPEG, TIFF, BMP or DICOM)", name
            ) from None
    except CXRError:
        raise
    except Exception as exc:  # any decoder failure on bad input becomes a CXRError
        raise CXRError(f"cannot decode image: {type(exc).__name__}: {exc}", name) from exc


def _finish(pixels: np.ndarray) -> np.ndarray:
    """Clean up to a C-contiguous float32 (H, W) array in [0, 1] (a float32 array: in place)."""
    if isinstance(pixels, np.ndarray) and pixels.dtype == np.float32 and pixels.flags.c_contiguous:
        np.nan_to_num(pixels, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(pixels, 0.0, 1.0, out=pixels)
    out = np.nan_to_num(np.asarray(pixels, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


def _minmax(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the data's own range; a constant image becomes all zeros."""
    arr = np.asarray(arr, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.float64)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float64)
    return (arr - lo) / (hi - lo)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3+) -> (H, W) luminance in the input's units; channels beyond 3 (alpha) are ignored."""
    return np.asarray(rgb[..., :3], dtype=np.float64) @ _LUMA


# --------------------------------------------------------------------------------------------- Pillow


def _open_unchecked(data: bytes) -> Image.Image | None:
    """Open (header only) through the format plugins directly, without Pillow's own size check: used when
    Pillow's global limit refuses an image, so that cxrscreen's limit is the one that decides."""
    Image.init()
    for fmt in _PIL_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(data[:16]):
            continue
        try:
            return factory(io.BytesIO(data), None)
        except Exception:  # a header this plugin cannot read: try the next one
            continue
    return None


_PIL_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


def _pil_pixel_bytes(mode: str) -> int:
    """Bytes per pixel of a decoded Pillow image of ``mode`` (16-bit modes 2, 32-bit and 4-band modes 4)."""
    if mode.startswith("I;16"):
        return 2
    return _PIL_PIXEL_BYTES.get(mode, 4)


def _check_decoded_bytes(width: int, height: int, pixel_bytes: int, mode: str, limit: int, name: str) -> None:
    """CXRError when width * height * pixel_bytes is over ``limit`` (from the header, before decoding)."""
    size = width * height * pixel_bytes
    if size > limit:
        raise CXRError(f"image is {width}x{height} {mode} ({pixel_bytes} bytes per pixel): {size:,} bytes "
                       f"once decoded, over the limit of {limit:,}", name)


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"


def _decode_pil(data: bytes, name: str, max_pixels: int, max_side: int | None = None,
                max_decoded_bytes: int = MAX_DECODED_BYTES) -> XRay:
    """Decode PNG/JPEG/TIFF/BMP with Pillow; raises UnidentifiedImageError for non-images.

    The size is checked from the header before any pixel is decoded. With ``max_side``, a JPEG is
    decoded at 1/2 to 1/8 scale by the codec itself (draft mode) and any image is then shrunk (area
    interpolation, on its integer samples) so that its long side is at most ``max_side``.
    """
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces PIL's; its warning must not reach callers.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(_PIL_FORMATS))
        except Image.DecompressionBombError as exc:
            unchecked = _open_unchecked(data)
            if unchecked is None:
                raise CXRError(f"image is over the limit of {max_pixels:,} pixels", name) from exc
            img = unchecked
        width, height = img.size
        if width * height > max_pixels:
            raise CXRError(_too_large(width, height, max_pixels), name)
        if width == 0 or height == 0:
            raise CXRError(f"image has no pixels ({width}x{height})", name)
        fmt = (img.format or "unknown").lower()
        frames = int(getattr(img, "n_frames", 1) or 1)
        mode = img.mode
        bits_hint = _pil_bits_hint(img)
        draft_scale = None
        if max_side is not None and fmt in ("jpeg", "mpo") and max(width, height) > max_side:
            factor = max_side / max(width, height)
            got = img.draft(img.mode, (max(1, int(width * factor)), max(1, int(height * factor))))
            if got is not None and img.size != (width, height):
                draft_scale = int(round(width / img.size[0]))
        _check_decoded_bytes(img.size[0], img.size[1], _pil_pixel_bytes(img.mode), mode, max_decoded_bytes,
                             name)
        try:
            img.load()
            orientation = img.getexif().get(0x0112)
            oriented = orientation in (2, 3, 4, 5, 6, 7, 8)
            if oriented:  # exif_transpose copies even an upright image: only call it when it turns one
                img = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise CXRError(f"truncated or corrupt {fmt.upper()} file ({exc})", name) from exc
        swapped = orientation in (5, 6, 7, 8)  # EXIF orientations that transpose
        value_range = None
        if img.mode in ("I", "F"):  # the whole image's range, before any reduction narrows it
            if img.mode == "F":
                _check_finite(img, name)
            value_range = img.getextrema()
        levels = None
        if max_side is not None and max(img.size) >= 2 * max_side:
            img, levels = _reduce_in_pil(img, max_side, fmt, bits_hint, value_range)
        raw, to_grey, dtype, bits = _pil_samples(img, fmt, bits_hint, value_range)
        if mode == "1":
            dtype, bits = "bool", 1
        del img

    if levels is None:
        levels = _grey_levels(to_grey(_subsample(raw)))
    colour = _chroma_stats(raw) if raw.ndim == 3 else None
    decoded_hw = raw.shape[:2]
    if max_side is not None and max(decoded_hw) > max_side:
        raw = _shrink(raw, max_side)
    pixels = to_grey(raw)
    del raw
    meta: dict[str, Any] = {
        "format": "jpeg" if fmt == "mpo" else fmt,
        "original_dtype": dtype,
        "bits": bits,
        "mode": mode,
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "inverted": False,
        "grey_levels": levels,
    }
    if colour is not None:
        meta["colour"] = colour
    ow, oh = (height, width) if swapped else (width, height)
    if pixels.shape != (oh, ow):  # reduced while decoding: keep the original size
        meta["original_width"], meta["original_height"] = ow, oh
    if draft_scale is not None:
        meta["jpeg_draft_scale"] = draft_scale
    if frames > 1:
        meta["frames"] = frames  # only the first frame is read
    if oriented:
        meta["exif_transposed"] = True
    return XRay(pixels=pixels, path=name, meta=meta)


_PIL_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "I", "F", "CMYK")


def _check_finite(img: Image.Image, name: str) -> None:
    """CXRError when a float image holds a NaN or infinite pixel (read in bands of rows: bounded memory).

    Such a file is damaged or no image at all; replacing the values would invent pixels."""
    w, h = img.size
    step = max(1, 1_048_576 // max(1, w))
    for r in range(0, h, step):
        band = np.asarray(img.crop((0, r, w, min(h, r + step))))
        bad = int(band.size - np.count_nonzero(np.isfinite(band)))
        if bad:
            raise CXRError(f"image holds NaN or infinite pixel values (first found in rows {r}-{min(h, r + step) - 1});"
                           " refusing a damaged image rather than guessing those pixels", name)


def _reduce_in_pil(img: Image.Image, max_side: int, fmt: str, bits_hint: int | None,
                   value_range: tuple[float, float] | None = None) -> tuple[Image.Image, int | None]:
    """(the image box-reduced by an integer factor to a long side of at least ``max_side``, its grey levels
    counted before the reduction); other modes than 8-bit grey / colour come back unchanged, levels None.

    Reducing inside Pillow avoids a full-size numpy copy of the decoded samples."""
    if img.mode == "1":
        img = img.convert("L")
    palette = img.mode in ("P", "PA")
    if img.mode not in _PIL_REDUCIBLE and not palette:
        return img, None
    w, h = img.size
    step = max(1, int(np.ceil(np.sqrt(w * h / 262_144))))
    sample = img.resize((max(1, w // step), max(1, h // step)), Image.Resampling.NEAREST)  # original values only
    s_raw, s_grey, _, _ = _pil_samples(sample, fmt, bits_hint, value_range)
    levels = _grey_levels(s_grey(s_raw))
    factor = max(w, h) // max_side
    if factor < 2:
        return img, levels
    if palette:  # palette indices cannot be averaged: every factor-th pixel (palette images are drawings)
        return img.resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.NEAREST), levels
    return img.reduce(factor), levels


def _pil_bits_hint(img: Image.Image) -> int | None:
    """Bits per sample from the file header, where the format records it (TIFF); else None."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return None
    bps = tags.get(258)  # BitsPerSample
    if isinstance(bps, tuple | list):
        bps = bps[0] if bps else None
    return int(bps) if isinstance(bps, int | float) and bps > 0 else None


Converter = Callable[[np.ndarray], np.ndarray]


def _lut(n_values: int, scale: float) -> Converter:
    """Integer samples -> float32 [0, 1] through a table of value / scale computed in float64 (bit for bit
    what dividing in float64 and casting gives, without any full-size float64 array)."""
    table = np.clip(np.arange(n_values, dtype=np.float64) / scale, 0.0, 1.0).astype(np.float32)
    return lambda a: np.ascontiguousarray(table[a])


def _by_rows(fn: Callable[[np.ndarray], np.ndarray]) -> Converter:
    """Apply a float64 conversion in blocks of rows, into float32 (bounded float64 scratch memory)."""

    def convert(a: np.ndarray) -> np.ndarray:
        out = np.empty(a.shape[:2], dtype=np.float32)
        step = max(1, 262_144 // max(1, a.shape[1]))
        for r in range(0, a.shape[0], step):
            out[r : r + step] = _finish(fn(a[r : r + step]))
        return out

    return convert


def _minmax_of(arr: np.ndarray) -> Converter:
    """Scale by the whole array's own range (see _minmax), so that a shrunk copy maps the same way."""
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if finite.size == 0:
        return _by_rows(lambda a: np.zeros(a.shape, dtype=np.float64))
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return _by_rows(lambda a: np.zeros(a.shape, dtype=np.float64))
    return _by_rows(lambda a: (np.asarray(a, dtype=np.float64) - lo) / (hi - lo))


def _range_converter(lo: float, hi: float) -> Converter:
    """Scale by a known range (lo -> 0, hi -> 1); an empty range gives zeros."""
    if hi <= lo:
        return _by_rows(lambda a: np.zeros(a.shape, dtype=np.float64))
    return _by_rows(lambda a: (np.asarray(a, dtype=np.float64) - lo) / (hi - lo))


def _pil_samples(img: Image.Image, fmt: str, bits_hint: int | None,
                 value_range: tuple[float, float] | None = None) -> tuple[np.ndarray, Converter, str, int]:
    """(samples as decoded: (H, W) or (H, W, C), their conversion to grey float32 [0, 1], original numpy
    dtype name, bits per sample). ``value_range``: (min, max) of the full image for modes I and F (when
    ``img`` is a reduced copy); None: measured on ``img``."""
    mode = img.mode
    if mode == "1":
        return np.asarray(img.convert("L")), _lut(256, 255.0), "bool", 1
    if mode in ("L", "LA"):  # LA: alpha dropped, not composited
        arr = np.asarray(img)
        grey = arr[..., 0] if arr.ndim == 3 else arr
        return np.ascontiguousarray(grey), _lut(256, 255.0), str(arr.dtype), 8
    if mode.startswith("I;16"):
        arr = np.asarray(img)
        if arr.dtype.kind == "i":  # I;16S, rare: signed 16-bit
            return arr, _minmax_of(arr), str(arr.dtype), 16
        return arr.astype(np.uint16, copy=False), _lut(65536, 65535.0), str(arr.dtype), 16
    if mode == "I":
        arr = np.asarray(img)
        lo, hi = value_range if value_range is not None else img.getextrema()
        bits = 16 if fmt == "png" else bits_hint
        if bits is None:
            bits = 16 if hi <= 65535 else 32
        if lo < 0 or bits > 16:
            # signed, or 32-bit: a real X-ray fills a small part of 2**32 (dividing by 2**32 - 1 made it
            # blank), so the data's own range
            return arr, _range_converter(float(lo), float(hi)), str(arr.dtype), bits
        if hi < 2**bits:
            return arr.astype(np.uint16), _lut(2**bits, float(2**bits - 1)), str(arr.dtype), bits
        scale = float(2**bits - 1)
        return arr, _by_rows(lambda a: np.asarray(a, dtype=np.float64) / scale), str(arr.dtype), bits
    if mode == "F":
        arr = np.asarray(img)
        lo, hi = value_range if value_range is not None else img.getextrema()
        if lo >= 0.0 and hi <= 1.0:
            return arr, _by_rows(lambda a: np.asarray(a, dtype=np.float64)), str(arr.dtype), 32
        return arr, _range_converter(float(lo), float(hi)), str(arr.dtype), 32
    if mode in ("RGB", "RGBA", "RGBX"):
        arr = np.asarray(img)
        return arr, _by_rows(lambda a: _luminance(a) / 255.0), str(arr.dtype), 8
    # P, PA, CMYK, YCbCr, LAB, HSV, ...: through RGB (drops any alpha / palette transparency)
    arr = np.asarray(img.convert("RGBA" if mode in ("P", "PA") else "RGB"))
    return arr, _by_rows(lambda a: _luminance(a) / 255.0), str(arr.dtype), 8


def _subsample(arr: np.ndarray, budget: int = 262_144) -> np.ndarray:
    """Every k-th row and column so that at most about ``budget`` pixels remain (no interpolation)."""
    h, w = arr.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / budget))))
    return arr[::step, ::step]


def _grey_levels(grey: np.ndarray) -> int:
    """Distinct 8-bit grey levels (0..255) among the given [0, 1] pixels."""
    q = np.rint(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.int64)
    return int((np.bincount(q.ravel(), minlength=256) > 0).sum())


def _chroma_stats(rgb: np.ndarray) -> dict[str, float]:
    """Colour measured in the decoded samples: mean chroma (max - min of R, G, B on [0, 1]) and the
    fraction of strongly coloured pixels (chroma > CHROMA_STRONG), on a thumbnail of at most 128 px."""
    import cv2

    a = np.ascontiguousarray(rgb[..., :3])
    h, w = a.shape[:2]
    f = 128 / max(h, w)
    if f < 1:
        a = cv2.resize(a, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    a = a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else float(np.iinfo(a.dtype).max))
    chroma = a.max(axis=2) - a.min(axis=2)
    return {"mean_chroma": float(chroma.mean()), "strong_fraction": float((chroma > CHROMA_STRONG).mean())}


def _shrink(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Area-interpolated copy whose long side is ``max_side`` (integer samples stay integer)."""
    import cv2

    h, w = arr.shape[:2]
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    if arr.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        arr = arr.astype(np.float32)  # 32-bit integers: float32 is precise enough to be averaged
    if arr.ndim == 3 and arr.shape[2] > 4:
        arr = np.ascontiguousarray(arr[..., :3])
    return cv2.resize(np.ascontiguousarray(arr), size, interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, name: str, max_pixels: int, *, force: bool, max_side: int | None = None,
                  max_decoded_bytes: int = MAX_DECODED_BYTES) -> XRay:
    """Decode a single-frame DICOM image with pydicom: modality LUT, VOI LUT/window, MONOCHROME1 flip.

    ``max_side``: the stored samples are shrunk (area interpolation) before the LUTs are applied.
    ``meta["grey_levels"]`` counts distinct stored values (up to 256) in a subsample of the image.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CXRError(f"not a readable DICOM file ({exc})", name) from exc

    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = getattr(ds.get("SOPClassUID"), "name", None) or ds.get("SOPClassUID", "unknown")
        what = "DICOM file" if "SOPClassUID" in ds or not force else "file (not DICOM?)"
        raise CXRError(f"{what} has no pixel data (SOP class: {sop})", name)

    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows <= 0 or cols <= 0:
        raise CXRError(f"DICOM file has no valid image size (Rows={rows}, Columns={cols})", name)
    if rows * cols > max_pixels:
        raise CXRError(
            f"image is {cols}x{rows} = {rows * cols:,} pixels, over the limit of {max_pixels:,}", name
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    allocated = int(ds.get("BitsAllocated") or 16)
    samples_pp = int(ds.get("SamplesPerPixel") or 1)
    _check_decoded_bytes(cols, rows, max(1, samples_pp * allocated // 8), "DICOM", max_decoded_bytes, name)
    if frames > 1:
        raise CXRError(f"multi-frame DICOM ({frames} frames) is not supported; export a single frame", name)

    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    _check_decoder(tsyntax, name)
    try:
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError, NotImplementedError, ValueError...
        detail = " ".join(str(exc).split())
        if tsyntax is not None and tsyntax.is_compressed:
            hint = _DECODER_HINTS.get(str(tsyntax), _FALLBACK_HINT)
            raise CXRError(
                f"cannot decode compressed DICOM ({_ts_label(tsyntax)}) with the installed decoder: "
                f"{detail}; another decoder may read it: {hint}",
                name,
            ) from exc
        raise CXRError(f"cannot decode DICOM pixel data ({type(exc).__name__}: {detail})", name) from exc

    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise CXRError("DICOM pixel data holds NaN or infinite values; refusing a damaged image rather than "
                       "guessing those pixels", name)
    if raw.ndim == 3 and samples == 1:  # defensive: NumberOfFrames absent but data stacked
        raise CXRError(
            f"multi-frame DICOM ({raw.shape[0]} frames) is not supported; export a single frame", name
        )
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or raw.dtype.itemsize * 8)
    levels = min(256, int(np.unique(_subsample(raw)).size)) if raw.ndim == 2 else None
    palette = photometric == "PALETTE COLOR" and samples == 1
    if max_side is not None and max(rows, cols) > max_side and not palette:  # palette indices: after the LUT
        raw = _shrink(raw, max_side)

    inverted = False
    if palette:
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(raw, ds)
        pixels = _luminance(rgb) / float(np.iinfo(rgb.dtype).max if rgb.dtype.kind == "u" else 1.0)
        if max_side is not None and max(rows, cols) > max_side:
            pixels = _shrink(pixels, max_side)
        voi = "palette"
    elif samples >= 3 or raw.ndim == 3:
        # Colour: pydicom returns RGB (YBR converted); scale by the stored bit depth, then luminance.
        pixels = _luminance(raw) / float(2**bits - 1) if raw.dtype.kind in "ui" else _minmax(_luminance(raw))
        voi = "none"
    else:
        pixels, voi = _dicom_grey(raw, ds, name)
        if photometric == "MONOCHROME1":
            np.subtract(np.float32(1.0), pixels, out=pixels)
            inverted = True

    meta: dict[str, Any] = {
        "format": "dicom",
        "original_dtype": str(raw.dtype),
        "bits": bits,
        "mode": photometric,
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "photometric": photometric,
        "inverted": inverted,
        "voi": voi,
        "view_position": _dicom_str(ds, "ViewPosition"),
        "modality": _dicom_str(ds, "Modality"),
        "body_part": _dicom_str(ds, "BodyPartExamined"),
        "transfer_syntax": None if tsyntax is None else str(tsyntax),
    }
    if levels is not None:
        meta["grey_levels"] = levels
    if pixels.shape != (rows, cols):
        meta["original_width"], meta["original_height"] = cols, rows
    age = _dicom_str(ds, "PatientAge")
    if age:
        meta["patient_age"] = age
    from cxrscreen.io.dicom_identity import identity_of

    return XRay(pixels=_finish(pixels), path=name, meta=meta, dicom=identity_of(ds))


def _dicom_str(ds: Any, keyword: str) -> str | None:
    """A text element, stripped; a multi-valued one joined with DICOM's own separator (``PA\\LL``)."""
    from pydicom.multival import MultiValue

    value = ds.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v).strip() for v in value)
    else:
        text = "" if value is None else str(value).strip()
    return text or None


def _dicom_grey(raw: np.ndarray, ds: Any, name: str) -> tuple[np.ndarray, str]:
    """Modality LUT then VOI LUT / window, normalised to [0, 1] by the VOI's output range, as float32.

    Computed in bands of rows (float64 scratch of about 8 MB, whatever the image size): a 7071 x 7071
    16-bit image cost 1.6 GB in whole-image float64 copies before.
    Returns (pixels, how): how is "lut", "window" or "minmax" (no VOI in the file, or an unusable one).
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    step = max(1, 1_048_576 // max(1, raw.shape[1]))
    bands = [slice(r, r + step) for r in range(0, raw.shape[0], step)]

    def modality(band: slice) -> np.ndarray:
        try:
            return np.asarray(apply_modality_lut(raw[band], ds), dtype=np.float64)
        except Exception as exc:
            raise CXRError(f"invalid DICOM rescale / modality LUT ({type(exc).__name__}: {exc})", name) from exc

    def scaled(transform: Callable[[slice], np.ndarray], lo: float | None = None,
               hi: float | None = None) -> np.ndarray:
        """transform(band) for every band into float32, scaled from [lo, hi] (None: its own range,
        measured in a first pass)."""
        if lo is None or hi is None:
            lo, hi = np.inf, -np.inf
            for band in bands:
                v = transform(band)
                v = v[np.isfinite(v)]
                if v.size:
                    lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
        out = np.zeros(raw.shape, dtype=np.float32)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
            return out
        for band in bands:
            out[band] = _finish((transform(band) - lo) / (hi - lo))
        return out

    def minmax() -> np.ndarray:
        return scaled(modality)

    seq = ds.get("VOILUTSequence")
    has_lut = bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        return minmax(), "minmax"

    def voi(band: slice) -> np.ndarray:
        values = modality(band)
        if has_lut:
            values = np.rint(values).astype(np.int64)  # a VOI LUT is indexed by integers
        with np.errstate(all="ignore"):  # SIGMOID windows overflow exp() at extremes
            return np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), dtype=np.float64)

    try:
        # The display range of the VOI: every LUT entry, or the window's clamped outputs.
        if has_lut:
            n_entries, first = int(seq[0].LUTDescriptor[0]) or 65536, int(seq[0].LUTDescriptor[1])
            probe = np.arange(first, first + n_entries, dtype=np.int64)
        else:
            probe = np.array([-1e12, 1e12], dtype=np.float64)  # far outside any window: its clamped ends
        with np.errstate(all="ignore"):
            edges = np.asarray(apply_voi_lut(probe, ds, index=0, prefer_lut=True), dtype=np.float64)
        voi(bands[0])  # a malformed window / LUT fails here, before the full pass
    except CXRError:
        raise
    except Exception:  # a malformed window/LUT: fall back to the data's own range
        return minmax(), "minmax"
    lo, hi = float(edges.min()), float(edges.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return scaled(voi), "minmax"
    return scaled(voi, lo, hi), ("lut" if has_lut else "window")


def _check_decoder(tsyntax: Any, name: str) -> None:
    """Raise CXRError before decoding if pydicom has no usable plugin for a compressed syntax."""
    if tsyntax is None or not tsyntax.is_compressed:
        return
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise CXRError(
            f"DICOM transfer syntax {_ts_label(tsyntax)} is not supported by pydicom", name
        ) from exc
    except Exception:  # older/newer pydicom: let pixel_array report it
        return
    if not decoder.is_available:
        raise CXRError(_decoder_message(tsyntax), name)


def _ts_label(tsyntax: Any) -> str:
    label = getattr(tsyntax, "name", "") or ""
    return f"'{label}' ({tsyntax})" if label and label != str(tsyntax) else str(tsyntax)


def _decoder_message(tsyntax: Any) -> str:
    hint = _DECODER_HINTS.get(str(tsyntax), _FALLBACK_HINT)
    return (
        f"no decoder installed for compressed DICOM transfer syntax {_ts_label(tsyntax)}; to read it: {hint}"
    )


__all__ = [
    "MAX_PIXELS",
    "SUPPORTED_SUFFIXES",
    "XRay",
    "decoded_bytes_estimate",
    "is_supported_file",
    "read_xray",
    "read_xray_bytes",
]
