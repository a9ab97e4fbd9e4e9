"""Tests for cxrscreen.io: every supported format from small generated files, and every kind of bad input."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from cxrscreen.errors import CXRError
from cxrscreen.io.xray import MAX_PIXELS, SUPPORTED_SUFFIXES, XRay, is_supported_file, read_xray, read_xray_bytes
from cxrscreen.synthetic import write_dicom

# ----------------------------------------------------------------------------------------------- helpers


def _check(x: XRay, shape: tuple[int, int]) -> None:
    """Invariants of every successful read."""
    assert isinstance(x, XRay)
    assert x.pixels.dtype == np.float32
    assert x.pixels.shape == shape
    assert x.pixels.flags["C_CONTIGUOUS"]
    assert np.all(np.isfinite(x.pixels))
    assert float(x.pixels.min()) >= 0.0 and float(x.pixels.max()) <= 1.0
    assert x.meta["height"] == shape[0] and x.meta["width"] == shape[1]
    for key in ("format", "original_dtype", "bits", "mode"):
        assert key in x.meta


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _shipped(name: str) -> str:
    """A pydicom test file shipped in its wheel (never downloaded)."""
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"pydicom does not ship {name} in this install")
    return str(found)


def _dicom(path: Path, stored: np.ndarray, *, bits_stored: int = 12, **kw: object) -> Path:
    """A DICOM file of `stored`; 12 bits stored unless told, like most DX detectors."""
    return write_dicom(path, stored, bits_stored=bits_stored, **kw)


# ----------------------------------------------------------------------------------------------- PNG / JPEG


def test_png_grey8(tmp_path: Path) -> None:
    arr = np.array([[0, 128, 255], [10, 20, 30]], dtype=np.uint8)
    x = read_xray(_save(Image.fromarray(arr, "L"), tmp_path / "g8.png"))
    _check(x, (2, 3))
    np.testing.assert_allclose(x.pixels, arr / 255.0, atol=1e-6)
    assert x.meta["format"] == "png" and x.meta["mode"] == "L"
    assert x.meta["bits"] == 8 and x.meta["original_dtype"] == "uint8"
    assert x.path == str(tmp_path / "g8.png")


def test_png_grey16_scaled_by_65535(tmp_path: Path) -> None:
    arr = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    x = read_xray(_save(Image.fromarray(arr), tmp_path / "g16.png"))
    _check(x, (2, 2))
    assert x.pixels[1, 0] == pytest.approx(1.0)
    assert x.pixels[0, 1] == pytest.approx(0.5, abs=1e-4)
    assert x.pixels[0, 0] == 0.0
    assert x.meta["bits"] == 16 and x.meta["mode"].startswith("I;16")


def test_png_rgb_to_luminance(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 3), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0)
    arr[0, 1] = (0, 255, 0)
    arr[1, 0] = (0, 0, 255)
    arr[1, 1] = (100, 100, 100)
    x = read_xray(_save(Image.fromarray(arr, "RGB"), tmp_path / "rgb.png"))
    _check(x, (2, 2))
    np.testing.assert_allclose(x.pixels, [[0.299, 0.587], [0.114, 100 / 255]], atol=1e-4)
    assert x.meta["mode"] == "RGB"


def test_png_rgba_alpha_is_dropped_not_composited(tmp_path: Path) -> None:
    arr = np.zeros((1, 2, 4), dtype=np.uint8)
    arr[0, 0] = (180, 180, 180, 0)  # fully transparent: keeps its grey value
    arr[0, 1] = (60, 60, 60, 255)
    x = read_xray(_save(Image.fromarray(arr, "RGBA"), tmp_path / "rgba.png"))
    _check(x, (1, 2))
    np.testing.assert_allclose(x.pixels, [[180 / 255, 60 / 255]], atol=1e-4)


def test_png_la_alpha_is_dropped(tmp_path: Path) -> None:
    arr = np.array([[[200, 0], [50, 255]]], dtype=np.uint8)
    x = read_xray(_save(Image.fromarray(arr, "LA"), tmp_path / "la.png"))
    _check(x, (1, 2))
    np.testing.assert_allclose(x.pixels, [[200 / 255, 50 / 255]], atol=1e-6)


def test_png_palette(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (768 - 9))
    img.putdata([0, 1, 2])
    x = read_xray(_save(img, tmp_path / "pal.png", transparency=1))  # transparency is ignored too
    _check(x, (1, 3))
    np.testing.assert_allclose(x.pixels, [[0.0, 1.0, 0.299]], atol=1e-4)
    assert x.meta["mode"] == "P"


def test_png_one_bit(tmp_path: Path) -> None:
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    x = read_xray(_save(img, tmp_path / "bw.png"))
    _check(x, (1, 2))
    np.testing.assert_array_equal(x.pixels, [[0.0, 1.0]])
    assert x.meta["bits"] == 1


def test_jpeg_grey_and_rgb(tmp_path: Path) -> None:
    grad = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (32, 1))
    x = read_xray(_save(Image.fromarray(grad, "L"), tmp_path / "g.jpg", quality=95))
    _check(x, (32, 64))
    np.testing.assert_allclose(x.pixels, grad / 255.0, atol=0.03)
    assert x.meta["format"] == "jpeg"
    rgb = np.repeat(grad[..., None], 3, axis=2)
    y = read_xray(_save(Image.fromarray(rgb, "RGB"), tmp_path / "c.jpeg", quality=95))
    _check(y, (32, 64))
    np.testing.assert_allclose(y.pixels, grad / 255.0, atol=0.03)


def test_jpeg_exif_orientation_applied(tmp_path: Path) -> None:
    img = Image.fromarray(np.zeros((10, 30), dtype=np.uint8), "L")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees for display
    x = read_xray(_save(img, tmp_path / "rot.jpg", exif=exif))
    _check(x, (30, 10))
    assert x.meta.get("exif_transposed") is True


def test_tiff_16bit(tmp_path: Path) -> None:
    arr = np.array([[0, 65535]], dtype=np.uint16)
    x = read_xray(_save(Image.fromarray(arr), tmp_path / "t.tif"))
    _check(x, (1, 2))
    np.testing.assert_allclose(x.pixels, [[0.0, 1.0]], atol=1e-6)
    assert x.meta["format"] == "tiff"


def test_constant_image_is_not_an_error(tmp_path: Path) -> None:
    x = read_xray(_save(Image.new("L", (8, 4), 0), tmp_path / "black.png"))
    _check(x, (4, 8))
    assert float(x.pixels.max()) == 0.0
    d = read_xray(_dicom(tmp_path / "flat.dcm", np.full((4, 4), 700, dtype=np.uint16)))
    _check(d, (4, 4))
    assert float(d.pixels.max()) == 0.0


def test_read_xray_bytes_png_and_errors_use_name(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 255]], dtype=np.uint8), "L").save(buf, format="PNG")
    x = read_xray_bytes(buf.getvalue(), name="upload.png")
    _check(x, (1, 2))
    assert x.path == "upload.png"
    np.testing.assert_array_equal(x.pixels, [[0.0, 1.0]])
    with pytest.raises(CXRError, match="scan-42.png"):
        read_xray_bytes(b"hello, not an image", name="scan-42.png")
    with pytest.raises(CXRError, match="<upload>"):
        read_xray_bytes(b"")
    dcm = _dicom(tmp_path / "b.dcm", np.array([[0, 4095]], dtype=np.uint16))
    d = read_xray_bytes(dcm.read_bytes(), name="b")
    assert d.meta["format"] == "dicom" and d.path == "b"


# ----------------------------------------------------------------------------------------------- DICOM


def test_dicom_mono2_rescale_and_window(tmp_path: Path) -> None:
    stored = np.array([[0, 500], [1000, 2000]], dtype=np.uint16)
    # HU = 2 * stored - 1000 -> [[-1000, 0], [1000, 3000]]; window 0 / 2001 spans -1000..1000.
    path = _dicom(
        tmp_path / "dx.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=0,
        WindowWidth=2001,
        ViewPosition="PA",
        PatientAge="045Y",
    )
    x = read_xray(path)
    _check(x, (2, 2))
    # DICOM linear window: ((v - (c - 0.5)) / (w - 1) + 0.5), clamped to [0, 1]
    expected = np.clip((np.array([[-1000, 0], [1000, 3000]]) + 0.5) / 2000 + 0.5, 0, 1)
    np.testing.assert_allclose(x.pixels, expected, atol=1e-4)
    m = x.meta
    assert m["format"] == "dicom" and m["photometric"] == "MONOCHROME2" and m["mode"] == "MONOCHROME2"
    assert m["view_position"] == "PA" and m["modality"] == "DX" and m["patient_age"] == "045Y"
    assert m["inverted"] is False and m["bits"] == 12 and m["original_dtype"] == "uint16"
    assert m["voi"] == "window"


def test_dicom_without_window_uses_min_max_and_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = np.array([[100, 200], [300, 500]], dtype=np.uint16)
    m2 = read_xray(_dicom(tmp_path / "m2.dcm", stored))
    np.testing.assert_allclose(m2.pixels, [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)
    assert m2.meta["voi"] == "minmax" and "patient_age" not in m2.meta
    m1 = read_xray(_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    _check(m1, (2, 2))
    np.testing.assert_allclose(m1.pixels, 1.0 - m2.pixels, atol=1e-6)
    assert m1.meta["inverted"] is True and m1.meta["photometric"] == "MONOCHROME1"


def test_dicom_voi_lut_sequence(tmp_path: Path) -> None:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4, 0, 8])  # 4 entries, first input value 0, 8-bit output
    item.add_new("LUTData", "US", [0, 51, 102, 255])
    x = read_xray(
        _dicom(tmp_path / "lut.dcm", np.array([[0, 1, 2, 3]], dtype=np.uint16), VOILUTSequence=[item])
    )
    np.testing.assert_allclose(x.pixels, [[0.0, 0.2, 0.4, 1.0]], atol=1e-6)
    assert x.meta["voi"] == "lut"


def test_dicom_rgb_to_luminance(tmp_path: Path) -> None:
    rgb = np.array([[[255, 0, 0], [90, 90, 90]]], dtype=np.uint8)
    x = read_xray(_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB", bits_stored=8))
    _check(x, (1, 2))
    np.testing.assert_allclose(x.pixels, [[0.299, 90 / 255]], atol=1e-4)


def test_dicom_without_suffix_found_by_preamble(tmp_path: Path) -> None:
    path = _dicom(tmp_path / "IM0001", np.array([[0, 10]], dtype=np.uint16))
    assert is_supported_file(path)
    x = read_xray(path)
    assert x.meta["format"] == "dicom"
    text = tmp_path / "README"
    text.write_text("not an image")
    assert not is_supported_file(text)
    assert is_supported_file(tmp_path / "a.PNG") and is_supported_file("b.dcm")
    assert not is_supported_file(tmp_path / "c.txt")
    assert {".png", ".jpg", ".jpeg", ".dcm", ".dicom"} <= set(SUPPORTED_SUFFIXES)


def test_dicom_multiframe_refused(tmp_path: Path) -> None:
    stack = np.zeros((3, 4, 4), dtype=np.uint16)
    path = _dicom(tmp_path / "cine.dcm", stack, frames=3)
    with pytest.raises(CXRError, match=r"multi-frame DICOM \(3 frames\) is not supported") as info:
        read_xray(path)
    assert "cine.dcm" in str(info.value)


def test_dicom_without_pixel_data_refused(tmp_path: Path) -> None:
    path = _dicom(tmp_path / "nopix.dcm", np.zeros((4, 4), dtype=np.uint16), pixel_data=False)
    with pytest.raises(CXRError, match="no pixel data") as info:
        read_xray(path)
    assert "nopix.dcm" in str(info.value)


def test_dicom_truncated_pixel_data(tmp_path: Path) -> None:
    path = _dicom(tmp_path / "cut.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4000])
    with pytest.raises(CXRError) as info:
        read_xray(path)
    assert "cut.dcm" in str(info.value)


def test_dicom_over_pixel_limit(tmp_path: Path) -> None:
    path = _dicom(tmp_path / "big.dcm", np.zeros((20, 30), dtype=np.uint16))
    with pytest.raises(CXRError, match="over the limit") as info:
        read_xray(path, max_pixels=599)
    assert "big.dcm" in str(info.value)
    assert read_xray(path, max_pixels=600).pixels.shape == (20, 30)


@pytest.mark.parametrize(("name", "modality"), [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")])
def test_shipped_real_uncompressed_dicom(name: str, modality: str) -> None:
    ds = pydicom.dcmread(_shipped(name), stop_before_pixels=True)
    x = read_xray(_shipped(name))
    _check(x, (int(ds.Rows), int(ds.Columns)))
    assert x.meta["modality"] == modality
    assert float(x.pixels.std()) > 0.05  # a real image, not a flat field


def test_dcm_suffix_without_preamble_is_still_read_as_dicom(tmp_path: Path) -> None:
    path = _dicom(tmp_path / "full.dcm", np.array([[0, 4095]], dtype=np.uint16))
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(path.read_bytes()[132:])  # drop the 128-byte preamble and "DICM"
    x = read_xray(bare)
    assert x.meta["format"] == "dicom"
    np.testing.assert_allclose(x.pixels, [[0.0, 1.0]])


def test_shipped_non_image_dicom_refused() -> None:
    path = _shipped("rtplan.dcm")
    with pytest.raises(CXRError, match=r"no pixel data \(SOP class: RT Plan Storage\)") as info:
        read_xray(path)
    assert "rtplan.dcm" in str(info.value)


# Compressed files: the read must succeed where pydicom has a working decoder, else name the codec.
_COMPRESSED = [
    ("JPEG2000.dcm", "JPEG 2000"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000"),
    ("MR_small_RLE.dcm", "RLE"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS"),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless"),
]


@pytest.mark.parametrize(("name", "codec"), _COMPRESSED)
def test_shipped_compressed_dicom(name: str, codec: str) -> None:
    from pydicom.pixels import get_decoder

    path = _shipped(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    tsyntax = ds.file_meta.TransferSyntaxUID
    assert tsyntax.is_compressed
    if get_decoder(tsyntax).is_available:
        x = read_xray(path)
        _check(x, (int(ds.Rows), int(ds.Columns)))
        assert x.meta["transfer_syntax"] == str(tsyntax)
        if name.startswith("MR_small_"):  # lossless copies of MR_small.dcm: identical result
            np.testing.assert_allclose(x.pixels, read_xray(_shipped("MR_small.dcm")).pixels, atol=1e-6)
    else:
        with pytest.raises(CXRError, match="no decoder installed") as info:
            read_xray(path)
        message = str(info.value)
        assert name in message and codec in message and "pip install" in message


def test_missing_decoder_message_names_syntax_and_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    class _NoDecoder:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: _NoDecoder())
    with pytest.raises(CXRError) as info:
        read_xray(_shipped("MR_small_jp2klossless.dcm"))
    message = str(info.value)
    assert "MR_small_jp2klossless.dcm" in message and "JPEG 2000" in message
    assert "1.2.840.10008.1.2.4.90" in message and "pylibjpeg-openjpeg" in message


# ----------------------------------------------------------------------------------------------- bad input


def _assert_fails(path: Path | str, match: str, **kwargs: object) -> CXRError:
    with pytest.raises(CXRError, match=match) as info:
        read_xray(path, **kwargs)  # type: ignore[arg-type]
    assert Path(path).name in str(info.value)
    return info.value


def test_missing_file(tmp_path: Path) -> None:
    _assert_fails(tmp_path / "nope.png", "file not found")


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    _assert_fails(folder, "directory")


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    _assert_fails(empty, r"empty file \(0 bytes\)")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path: Path, suffix: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    path = _save(Image.fromarray(noise, "L"), tmp_path / f"cut{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_fails(path, "truncated|corrupt|cannot decode")


@pytest.mark.parametrize("suffix", [".png", ".dcm", ""])
def test_text_file_is_not_an_image(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"notes{suffix}"
    path.write_text("patient notes, definitely not pixels\n" * 20)
    _assert_fails(path, "not a recognised image|not a readable DICOM|no pixel data")


def test_pixel_limit_checked_before_decoding(tmp_path: Path) -> None:
    path = _save(Image.new("L", (100, 100)), tmp_path / "large.png")
    err = _assert_fails(path, "over the limit", max_pixels=5000)
    assert "10,000" in str(err)
    assert read_xray(path, max_pixels=10_000).pixels.shape == (100, 100)
    assert MAX_PIXELS == 50_000_000


def test_pil_decompression_bomb_never_leaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(Image.new("L", (20, 20)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 px: PIL warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_xray(path).pixels.shape == (20, 20)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 px > 2 * limit: PIL raises
    assert read_xray(path).pixels.shape == (20, 20)  # cxrscreen's limit decides, not Pillow's
    _assert_fails(path, "400 pixels, over the limit of 399", max_pixels=399)


# ------------------------------------------------------------------------------ memory and size limits


def _png_header_only(width: int, height: int) -> bytes:
    """The start of a PNG that claims width x height 8-bit grey pixels (no pixel data follows)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_huge_header_is_refused_with_the_projects_limit() -> None:
    """A header far over the limit (where Pillow raises its own bomb error) is refused before any decoding,
    and the message quotes cxrscreen's documented limit, not Pillow's."""
    with pytest.raises(CXRError) as info:
        read_xray_bytes(_png_header_only(20_000, 20_000), name="bomb.png")
    msg = str(info.value)
    assert msg.startswith("bomb.png: ") and "20000x20000" in msg and f"{MAX_PIXELS:,}" in msg, msg
    assert "178956970" not in msg and "178,956,970" not in msg  # Pillow's limit


def _peak_bytes(fn: object) -> tuple[object, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        out = fn()  # type: ignore[operator]
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def zeros_7000_png() -> bytes:
    """A 7000 x 7000 PNG of zeros: about 48 KB on disk, 49 million pixels."""
    buf = io.BytesIO()
    Image.new("L", (7000, 7000)).save(buf, format="PNG")
    return buf.getvalue()


def test_large_png_decodes_without_float64_copies(zeros_7000_png: bytes) -> None:
    """Full-resolution decoding costs the decoded pixels plus the float32 result, not several float64
    copies (1.35 GB for this 48 KB file before)."""
    x, peak = _peak_bytes(lambda: read_xray_bytes(zeros_7000_png, name="zeros.png"))
    assert x.pixels.shape == (7000, 7000)
    assert peak < 1.3 * 49e6 * 5, f"peak {peak / 1e6:.0f} MB"  # uint8 pixels + float32 result


def test_max_side_downscales_during_decode_in_bounded_memory(zeros_7000_png: bytes) -> None:
    x, peak = _peak_bytes(lambda: read_xray_bytes(zeros_7000_png, name="zeros.png", max_side=2048))
    assert max(x.pixels.shape) <= 2048 and x.pixels.shape[0] == x.pixels.shape[1]
    assert x.meta["original_width"] == x.meta["original_height"] == 7000
    assert (x.meta["width"], x.meta["height"]) == x.pixels.shape[::-1]
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB"  # reduced inside Pillow: no full-size numpy array


@pytest.mark.parametrize("mode", ["RGB", "P"])
def test_max_side_colour_and_palette_make_no_full_size_copy(mode: str) -> None:
    """A 7000 x 7000 colour or palette PNG under max_side: numpy never holds the full image (147-196 MB)."""
    buf = io.BytesIO()
    Image.new(mode, (7000, 7000)).save(buf, format="PNG")
    x, peak = _peak_bytes(lambda: read_xray_bytes(buf.getvalue(), name="c.png", max_side=2048))
    assert max(x.pixels.shape) <= 2048 and x.meta["original_width"] == 7000
    assert peak < 60e6, f"peak {peak / 1e6:.0f} MB"


def test_upright_image_is_not_marked_exif_transposed(tmp_path: Path) -> None:
    x = read_xray(_save(Image.new("L", (30, 10)), tmp_path / "upright.jpg"))
    assert "exif_transposed" not in x.meta


def test_large_jpeg_is_decoded_at_reduced_scale() -> None:
    """JPEG: the decoder's DCT scaling (Pillow draft mode) gives a 1/2..1/8 image directly."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (3000, 4000), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    x = read_xray_bytes(buf.getvalue(), name="big.jpg", max_side=1000)
    assert max(x.pixels.shape) <= 1000
    assert x.meta["jpeg_draft_scale"] in (2, 4, 8)
    assert (x.meta["original_width"], x.meta["original_height"]) == (4000, 3000)
    full = read_xray_bytes(buf.getvalue(), name="big.jpg")
    assert full.pixels.shape == (3000, 4000) and "jpeg_draft_scale" not in full.meta
    assert "original_width" not in full.meta  # not reduced: width / height are the original's


def test_integer_images_convert_exactly_as_before(tmp_path: Path) -> None:
    """The float32 pixels equal float32(value / (2**bits - 1)) computed in float64, bit for bit."""
    rng = np.random.default_rng(1)
    g8 = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (40, 50), dtype=np.uint16)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    x8 = read_xray(_save(Image.fromarray(g8), tmp_path / "g8.png"))
    x16 = read_xray(_save(Image.fromarray(g16), tmp_path / "g16.png"))
    xrgb = read_xray(_save(Image.fromarray(rgb), tmp_path / "rgb.png"))
    np.testing.assert_array_equal(x8.pixels, (g8 / 255.0).astype(np.float32))
    np.testing.assert_array_equal(x16.pixels, (g16 / 65535.0).astype(np.float32))
    lum = np.clip((rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0, 0, 1)
    np.testing.assert_array_equal(xrgb.pixels, lum.astype(np.float32))


def test_reduced_jpeg_with_exif_rotation_records_the_upright_original_size() -> None:
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (3000, 4000), dtype=np.uint8))  # stored 4000 wide, 3000 high
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated by 90 degrees: upright it is 3000 wide, 4000 high
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    x = read_xray_bytes(buf.getvalue(), name="rot.jpg", max_side=1000)
    assert x.meta["exif_transposed"] and x.pixels.shape[0] > x.pixels.shape[1] and max(x.pixels.shape) <= 1000
    assert (x.meta["original_width"], x.meta["original_height"]) == (3000, 4000)


def test_dicom_reduced_while_decoding(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:1200, 0:900]
    stored = ((xx + yy) % 4096).astype(np.uint16)
    path = _dicom(tmp_path / "big.dcm", stored, WindowCenter=2048, WindowWidth=4096)
    full = read_xray(path)
    small = read_xray(path, max_side=300)
    assert small.pixels.shape == (300, 225) and small.pixels.dtype == np.float32
    assert (small.meta["original_width"], small.meta["original_height"]) == (900, 1200)
    assert (small.meta["width"], small.meta["height"]) == (225, 300)
    assert full.meta["grey_levels"] == small.meta["grey_levels"] == 256  # counted before the reduction
    assert "original_width" not in full.meta
