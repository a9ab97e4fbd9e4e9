"""Tests for cxrscreen.synthetic: the DICOM files it writes read back as written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxrscreen.synthetic import to_uint8, write_dicom


def test_write_dicom_round_trips_pixels_and_tags(tmp_path: Path) -> None:
    stored = np.array([[0, 1000], [2000, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "sub" / "a.dcm", stored, bits_stored=12, ViewPosition="AP", PatientID="p7")
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(ds.pixel_array, stored)
    assert (ds.Modality, ds.ViewPosition, ds.PatientID, ds.BitsStored, ds.HighBit) == ("DX", "AP", "p7", 12, 11)
    assert path.read_bytes()[128:132] == b"DICM"  # preamble + prefix: a conformant file


def test_write_dicom_without_pixel_data_and_wrong_dtype(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dicom(tmp_path / "n.dcm", np.zeros((2, 2), np.uint8), pixel_data=False))
    assert "PixelData" not in ds and ds.BitsStored == 8
    with pytest.raises(TypeError, match="uint8 or uint16"):
        write_dicom(tmp_path / "f.dcm", np.zeros((2, 2), np.float32))


def test_to_uint8_rounds_and_clips() -> None:
    assert to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]
