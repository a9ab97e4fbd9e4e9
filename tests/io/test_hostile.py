"""Hostile files against the image reader (issue 21): files that are no regular files, sparse giants,
small compressed TIFFs that decode to hundreds of megabytes, NaN pixels and 32-bit integer X-rays."""

from __future__ import annotations

import io
import os
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrscreen.errors import CXRError
from cxrscreen.io.xray import MAX_FILE_BYTES, is_supported_file, read_xray, read_xray_bytes
from cxrscreen.synthetic import write_dicom


def _peak_bytes(fn: object) -> tuple[object, int]:
    """(fn(), the peak of Python-traced memory (numpy arrays, bytes) while it ran)."""
    tracemalloc.start()
    try:
        out = fn()  # type: ignore[operator]
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ not regular / too big


def test_sparse_giant_png_is_refused_by_its_size_before_reading(tmp_path: Path) -> None:
    """A sparse file larger than the limit (2 GB took 3 GB of memory before): refused from fstat."""
    p = tmp_path / "s.png"
    with open(p, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(CXRError) as info:
        read_xray(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: ") and "over the limit" in msg and f"{MAX_FILE_BYTES:,}" in msg, msg


def test_fifo_named_png_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    result: dict[str, BaseException | object] = {}

    def target() -> None:
        try:
            result["value"] = read_xray(fifo)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # the old reader blocks in open(): release it, then fail
        with open(fifo, "wb"):
            pass
        t.join(10)
        pytest.fail("reading a FIFO named .png hung")
    err = result.get("error")
    assert isinstance(err, CXRError) and "FIFO" in str(err) and str(fifo) in str(err), result
    assert not is_supported_file(tmp_path / "nosuffix") and is_supported_file(fifo)  # by suffix only


def test_extensionless_fifo_is_not_probed_for_dicom(tmp_path: Path) -> None:
    fifo = tmp_path / "noext"
    os.mkfifo(fifo)
    done: list[bool] = []
    t = threading.Thread(target=lambda: done.append(is_supported_file(fifo)), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        with open(fifo, "wb"):
            pass
        t.join(10)
        pytest.fail("probing an extension-less FIFO for DICOM hung")
    assert done == [False]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_character_device_is_refused() -> None:
    with pytest.raises(CXRError, match="character device"):
        read_xray("/dev/zero")


# ------------------------------------------------------------------------------------ decompression bombs


@pytest.mark.parametrize("mode", ["I", "F", "CMYK"])
def test_small_compressed_tiff_over_the_decoded_limit_is_refused_from_its_header(mode: str) -> None:
    """7071 x 7071 at 4 bytes per pixel: a few hundred KB deflated, 200 MB decoded (+0.6 GB of server
    memory per upload before). Refused before decoding: no numpy array of that size is ever made."""
    data = _tiff(Image.new(mode, (7071, 7071)))
    assert len(data) < 2_000_000
    with pytest.raises(CXRError) as info:
        read_xray_bytes(data, name="bomb.tif", max_side=2048)
    msg = str(info.value)
    assert msg.startswith("bomb.tif: ") and "once decoded, over the limit" in msg, msg


@pytest.mark.parametrize("mode", ["I", "F", "CMYK"])
def test_wide_tiff_under_max_side_is_reduced_without_a_full_size_array(mode: str) -> None:
    """Under the limit (5000 x 5000 x 4 bytes = 100 MB decoded) and reduced for the server (max_side):
    reduced inside the decoder, numpy never holds the full image."""
    img = Image.new(mode, (5000, 5000))
    data = _tiff(img)
    del img
    x, peak = _peak_bytes(lambda: read_xray_bytes(data, name="wide.tif", max_side=2048))
    assert max(x.pixels.shape) <= 2048 and x.meta["original_width"] == 5000
    assert peak < 80e6, f"peak {peak / 1e6:.0f} MB"  # the full image alone is 100 MB


def test_large_16bit_dicom_decodes_in_bounded_memory(tmp_path: Path) -> None:
    """Full resolution (the CLI): the stored samples, the file's bytes and the float32 result, no
    whole-image float64 copies (34 bytes per pixel before, 15 now; a 7071^2 16-bit DICOM cost 1.65 GB)."""
    n = 3000
    stored = (np.arange(n * n, dtype=np.uint32) % 4096).astype(np.uint16).reshape(n, n)
    path = write_dicom(tmp_path / "big.dcm", stored, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    del stored
    x, peak = _peak_bytes(lambda: read_xray(path))
    assert x.pixels.shape == (n, n) and x.meta["voi"] == "window"
    assert peak < 20 * n * n, f"peak {peak / 1e6:.0f} MB = {peak / (n * n):.1f} bytes per pixel"


def test_dicom_over_the_decoded_limit_is_refused_before_pixel_decode(tmp_path: Path) -> None:
    stored = np.zeros((100, 100), dtype=np.uint16)
    path = write_dicom(tmp_path / "d.dcm", stored)
    with pytest.raises(CXRError, match="once decoded, over the limit of 19,999"):
        read_xray(path, max_decoded_bytes=19_999)
    assert read_xray(path, max_decoded_bytes=20_000).pixels.shape == (100, 100)


# ------------------------------------------------------------------------------------ wrong values


def test_float_tiff_with_nan_pixels_is_refused(tmp_path: Path) -> None:
    """Every 7th pixel NaN: 28 of 31 real X-rays were still diagnosed before (NaN became black)."""
    arr = np.linspace(0.0, 1.0, 64 * 48, dtype=np.float32).reshape(64, 48)
    arr.ravel()[::7] = np.nan
    p = tmp_path / "nan.tif"
    Image.fromarray(arr, "F").save(p)
    with pytest.raises(CXRError, match="NaN or infinite"):
        read_xray(p)
    arr = np.nan_to_num(arr, nan=0.5)
    arr[3, 3] = np.inf
    Image.fromarray(arr, "F").save(p)
    with pytest.raises(CXRError, match="NaN or infinite"):
        read_xray_bytes(p.read_bytes(), name="inf.tif", max_side=16)


def test_32bit_integer_tiff_is_scaled_by_its_range_not_blank(tmp_path: Path) -> None:
    """A 12-bit X-ray stored as 32-bit integers: dividing by 2**32 - 1 made it black (called blank)."""
    rng = np.random.default_rng(0)
    arr = rng.integers(100, 4096, (60, 50)).astype(np.int32)
    arr[0, 0], arr[0, 1] = 100, 4095
    p = tmp_path / "x32.tif"
    Image.fromarray(arr, "I").save(p)
    x = read_xray(p)
    assert x.meta["bits"] == 32
    np.testing.assert_allclose(x.pixels, (arr - 100) / (4095 - 100), atol=1e-6)
    reduced = read_xray_bytes(p.read_bytes(), name="x32.tif", max_side=20)
    assert float(reduced.pixels.max()) > 0.5  # the reduced copy keeps the full image's range
