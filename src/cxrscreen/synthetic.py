"""Small synthetic inputs for tests, benchmarks and bug reports (no patient data involved).

`write_dicom` writes an uncompressed DICOM file from a pixel array, with any tags set by keyword, so a
reader can be checked against the DICOM cases it must handle (bit depths, MONOCHROME1, RGB, frames,
VOI LUT, missing pixel data, modality and view tags) without shipping real studies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(pixels, np.float64) * 255), 0, 255).astype(np.uint8)


def write_dicom(
    path: str | Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    frames: int = 1,
    pixel_data: bool = True,
    sop_class_uid: str = DX_STORAGE,
    **tags: object,
) -> Path:
    """Write `stored` (rows x cols, frames x rows x cols, or rows x cols x 3 for RGB; uint8 or uint16) as an
    Explicit VR Little Endian DICOM file with a preamble and file meta. Returns the path.

    bits_stored defaults to the dtype's width. Modality is "DX" unless a tag says otherwise; every
    keyword tag (e.g. ``ViewPosition="PA"``, ``PatientID="p1"``, ``VOILUTSequence=[...]``) is set as given.
    pixel_data=False leaves out the Pixel Data element (a file a reader must refuse).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    stored = np.asarray(stored)
    if stored.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"write_dicom stores uint8 or uint16 pixels, got {stored.dtype}")
    rgb = photometric == "RGB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    rows, cols = stored.shape[-3:-1] if rgb else stored.shape[-2:]
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
