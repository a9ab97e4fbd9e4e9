"""The DICOM identity of an input image: what a result written back as DICOM needs to reference it.

`read_xray` keeps it on ``XRay.dicom`` for DICOM inputs (None for PNG/JPEG/...). It holds the UIDs (study,
series, instance, SOP class), the acquisition fields that decide whether the image is screened at all
(modality, view, manufacturer) and the header without its pixel data (``header``), from which highdicom
copies the patient and study modules into the SR and the Secondary Capture. Only the UIDs appear in
``to_dict`` (the JSON output): patient identifiers never leave the header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# SOP classes of projection radiographs that are screened (DX for presentation / processing, CR).
DX_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
}
FRONTAL_VIEWS = ("PA", "AP", "")  # ViewPosition; empty: not recorded (many archives leave it out)


@dataclass
class DicomIdentity:
    """UIDs and header of one DICOM image (see the module docstring)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str = ""
    view_position: str = ""
    manufacturer: str = ""
    series_description: str = ""
    header: Any = field(default=None, repr=False, compare=False)  # pydicom Dataset without PixelData

    def to_dict(self) -> dict[str, str]:
        """The identifiers (UIDs and SOP class) as JSON-ready strings; no patient data."""
        return {"study_instance_uid": self.study_instance_uid, "series_instance_uid": self.series_instance_uid,
                "sop_instance_uid": self.sop_instance_uid, "sop_class_uid": self.sop_class_uid}

    def screenable(self, own_manufacturer: str | None = None) -> str | None:
        """None if this instance is a frontal DX/CR image that cxrscreen screens, else why not."""
        if own_manufacturer and self.manufacturer == own_manufacturer:
            return "written by cxrscreen"
        if self.sop_class_uid not in DX_SOP_CLASSES:
            return f"not a DX/CR image (SOP class {self.sop_class_uid})"
        if self.view_position.upper() not in FRONTAL_VIEWS:
            return f"not a frontal view (ViewPosition {self.view_position})"
        return None


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def identity_of(ds: Any) -> DicomIdentity | None:
    """The identity of a pydicom Dataset (None without a Study/SOP Instance UID, e.g. a bare file written
    without them). ``header`` is a copy without the pixel data."""
    study, sop = _text(ds, "StudyInstanceUID"), _text(ds, "SOPInstanceUID")
    if not study or not sop:
        return None
    import pydicom

    header = pydicom.Dataset()
    for elem in ds:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            header.add(elem)
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        header.file_meta = file_meta
    return DicomIdentity(
        study_instance_uid=study,
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=sop,
        sop_class_uid=_text(ds, "SOPClassUID"),
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
        manufacturer=_text(ds, "Manufacturer"),
        series_description=_text(ds, "SeriesDescription"),
        header=header,
    )
