"""DX DICOM files for tests: a grey image (float in [0, 1]) stored as 12-bit MONOCHROME1 or MONOCHROME2."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def dx_dataset(pixels: np.ndarray, *, monochrome1: bool = False, study_uid: str | None = None,
               patient_id: str = "P0001", patient_name: str = "Test^Patient", view: str = "PA",
               manufacturer: str = "TestModality") -> object:
    """A pydicom Dataset of a DX For Presentation image: 12 bits stored in 16, MONOCHROME1 stores 4095 - v
    (so that both photometric interpretations show the same picture)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    values = np.rint(np.clip(np.asarray(pixels, np.float64), 0, 1) * 4095).astype(np.uint16)
    if monochrome1:
        values = (4095 - values).astype(np.uint16)
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_PRESENTATION, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = (
        "20260101", "120000", "ACC0001", "", "1")
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "DX", 1, 1, manufacturer
    ds.ViewPosition, ds.PatientOrientation, ds.BodyPartExamined = view, ["L", "F"], "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType, ds.ContentDate, ds.ContentTime = "FOR PRESENTATION", "20260101", "120000"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = values.tobytes()
    return ds


def write_dx(path: Path, pixels: np.ndarray, **kwargs: object) -> Path:
    """Write `dx_dataset(pixels, **kwargs)` to `path`; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dx_dataset(pixels, **kwargs).save_as(path, enforce_file_format=True)  # type: ignore[attr-defined]
    return path
