"""DICOM output of a prediction: a Comprehensive 3D SR (TID 1500) and a Secondary Capture of the heatmap.

Both are built with highdicom from the source image's header (`io.dicom_identity.DicomIdentity.header`),
land in the source's study (same Study Instance UID) in new series, and reference the source image.

The SR follows the IHE AI Results (AIR) profile as far as it applies to a whole-image classifier:

- root: TID 1500 Imaging Measurement Report (DCM 126000), procedure reported SCT 399208008 "Plain X-ray of
  chest", observer = the device (name cxrscreen, model = the architecture);
- one measurement group per class: finding type = the class's coded finding (`FINDINGS`), finding site
  lung (SCT 39607008), algorithm identification (TID 4019: family DCM 123110 "Artificial Intelligence",
  name, version = package version + weights sha256), the decision rule as the group's method (private
  code), a "Probability" measurement (DCM 122157, UCUM "1") whose Source of Measurement is the source
  image, for the thresholded class the threshold (private code, UCUM "1"), and "Presence of property"
  (DCM 121052) Present (SCT 52101004) for the class the rule chose, Absent (SCT 272519000) for the others;
- severity (when scored) as numeric measurements under the private coding scheme 99CXRSCREEN, declared in
  the SR's Coding Scheme Identification Sequence;
- completion COMPLETE when every class has a probability, PARTIAL when the input gate withheld the result
  (one group saying so, no probabilities); verification UNVERIFIED; Contributing Equipment names
  cxrscreen; the series description says "research use only, not for diagnosis".

UIDs are derived from the source SOP Instance UID, the weights' sha256 and the object kind
(`pydicom.uid.generate_uid` with those as entropy): the same input and model always give the same SR and SC
UIDs, which is how `cxrscreen pacs run` recognises work it already stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrscreen.errors import CXRError
from cxrscreen.results.result import PredictionResult

MANUFACTURER = "cxrscreen"
"""Manufacturer of every object cxrscreen writes; inputs from this manufacturer are never screened."""
PRIVATE_SCHEME = "99CXRSCREEN"
SR_SERIES_DESCRIPTION = "cxrscreen AI result - research use only, not for diagnosis"
SC_SERIES_DESCRIPTION = "cxrscreen heatmap - research use only, not for diagnosis"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SC_MAX_SIDE = 1024
"""Long side of the Secondary Capture's X-ray part (the heatmap overlay is reduced to it, never enlarged)."""

# class name -> (code value, scheme, meaning): SNOMED CT findings (see the README, "With a PACS").
FINDINGS: dict[str, tuple[str, str, str]] = {
    "covid": ("840539006", "SCT", "COVID-19"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "normal": ("17621005", "SCT", "Normal"),
}
# private codes (PRIVATE_SCHEME): severity items, decision rules, the threshold, the gate's withholding
PRIVATE_CODES: dict[str, str] = {
    "GEO_EXTENT": "COVID-19 geographic extent score (0-8)",
    "OPACITY": "COVID-19 opacity score (0-6)",
    "EXTENT_RIGHT": "Geographic extent score, right lung (0-4)",
    "EXTENT_LEFT": "Geographic extent score, left lung (0-4)",
    "RULE_ARGMAX": "Decision rule: most probable class",
    "RULE_OPERATING_POINT": "Decision rule: class threshold, else most probable other class",
    "THRESHOLD": "Decision threshold",
    "GATE": "Input gate",
    "WITHHELD": "Result withheld: not a frontal chest X-ray",
}


_UID_NAMESPACE = uuid.UUID("6f1c2f3e-7d1a-5b2c-9e47-c0c5c2e5a001")  # cxrscreen's, fixed once


@dataclass(frozen=True)
class ModelInfo:
    """What the SR says about the algorithm: name, version (package version + weights sha256), architecture."""

    name: str
    version: str
    weights_sha256: str
    arch: str
    classes: tuple[str, ...]

    @classmethod
    def of_run(cls, run: Any) -> ModelInfo:
        from cxrscreen import __version__

        sha = str(run.config.get("weights_sha256") or "unknown")
        return cls(name="cxrscreen chest X-ray screening", version=f"{__version__} weights-sha256:{sha}",
                   weights_sha256=sha, arch=str(run.arch), classes=tuple(run.classes))


def derived_uid(source_sop_uid: str, weights_sha256: str, kind: str) -> str:
    """A UID determined by the source instance (or study), the model and the object kind ('sr', 'sc',
    'sr-series', ...): reruns give the same UIDs. The 2.25 form of a name-based (SHA-1, version 5) UUID,
    as DICOM PS3.5 B.2 allows."""
    name = "\x00".join((source_sop_uid, weights_sha256, kind))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _code(value: str, scheme: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _private(key: str) -> Any:
    return _code(key, PRIVATE_SCHEME, PRIVATE_CODES[key])


def _finding(cls_name: str) -> Any:
    if cls_name not in FINDINGS:
        return _code(cls_name.upper()[:16], PRIVATE_SCHEME, f"cxrscreen class {cls_name}")
    return _code(*FINDINGS[cls_name])


def _coding_scheme() -> Any:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name="cxrscreen private codes",
                                          responsible_organization="cxrscreen project")


def _contributing_equipment(model: ModelInfo) -> Any:
    from highdicom import ContributingEquipment
    from pydicom.sr.codedict import codes

    return ContributingEquipment(manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
                                 manufacturer_model_name=model.arch[:64], software_versions=[model.version[:64]],
                                 contribution_description="AI screening result (research use only)")


def build_sr(result: PredictionResult, model: ModelInfo) -> Any:
    """The Comprehensive 3D SR of one result (see the module docstring). CXRError without a DICOM source or
    for a failed input."""
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        FindingSite,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurement,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    ident = result.dicom
    if ident is None or ident.header is None:
        raise CXRError("no DICOM source: SR and Secondary Capture are written for DICOM inputs only", result.path)
    if result.error:
        raise CXRError(f"no SR for a failed input ({result.error})", result.path)
    src = ident.header
    algo = AlgorithmIdentification(name=model.name, version=model.version, family=codes.DCM.ArtificialIntelligence,
                                   manufacturer=MANUFACTURER)
    observer = ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", model.weights_sha256, "device"), name=MANUFACTURER,
            manufacturer_name=MANUFACTURER, model_name=model.arch[:64])))
    source = SourceImageForMeasurement(ident.sop_class_uid, ident.sop_instance_uid)
    lung = FindingSite(anatomic_location=codes.SCT.Lung)
    unit = codes.UCUM.NoUnits
    decision = result.decision or {"rule": "argmax"}
    operating = decision.get("rule") == "operating_point"
    method = _private("RULE_OPERATING_POINT" if operating else "RULE_ARGMAX")
    groups = []
    if result.probabilities is not None:
        for i, (name, p) in enumerate(result.probabilities.items()):
            measurements = [Measurement(name=codes.DCM.Probability, value=float(p), unit=unit,
                                        referenced_images=[source], algorithm_id=algo)]
            if operating and decision.get("class") == name:
                measurements.append(Measurement(name=_private("THRESHOLD"), value=float(decision["threshold"]),
                                                unit=unit, algorithm_id=algo))
            if name == result.label and result.severity:
                sev = result.severity
                for key, value in (("GEO_EXTENT", sev["geographic_extent"]), ("OPACITY", sev["opacity"]),
                                   ("EXTENT_RIGHT", sev["per_lung"]["right"]),
                                   ("EXTENT_LEFT", sev["per_lung"]["left"])):
                    measurements.append(Measurement(name=_private(key), value=float(value),
                                                    unit=_code("{score}", "UCUM", "score"), algorithm_id=algo,
                                                    referenced_images=[source]))
            presence = codes.SCT.Present if name == result.label else codes.SCT.Absent
            groups.append(MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=derived_uid(ident.sop_instance_uid, model.weights_sha256, f"group:{name}"),
                    identifier=f"cxrscreen {name}"),
                finding_type=_finding(name), method=method, algorithm_id=algo, finding_sites=[lung],
                measurements=measurements,
                qualitative_evaluations=[QualitativeEvaluation(name=codes.DCM.PresenceOfProperty, value=presence)],
                session=f"{i + 1}"))
    else:  # the gate withheld the result: say so, with no probabilities
        groups.append(MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=derived_uid(ident.sop_instance_uid, model.weights_sha256, "group:gate"),
                identifier="cxrscreen input gate"),
            algorithm_id=algo,
            qualitative_evaluations=[QualitativeEvaluation(name=_private("GATE"), value=_private("WITHHELD"))]))
    report = MeasurementReport(observation_context=observer,
                               procedure_reported=_code("399208008", "SCT", "Plain X-ray of chest"),
                               imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    sr = Comprehensive3DSR(
        evidence=[src], content=report[0],
        series_instance_uid=derived_uid(ident.study_instance_uid, model.weights_sha256, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(ident.sop_instance_uid, model.weights_sha256, "sr"),
        instance_number=1, manufacturer=MANUFACTURER,
        is_complete=result.probabilities is not None, is_final=False, is_verified=False,
        series_description=SR_SERIES_DESCRIPTION, coding_schemes=[_coding_scheme()],
        contributing_equipment=[_contributing_equipment(model)])
    _ = hd  # highdicom imported for its side effects on pydicom's code tables
    return sr


def caption_lines(result: PredictionResult) -> list[str]:
    """The lines printed above the overlay: class and rule, probabilities, the research-use notice."""
    from cxrscreen.predict.prepared import format_probabilities

    rule = result.decision or {"rule": "argmax"}
    how = ("arg-max" if rule.get("rule") != "operating_point"
           else f"{rule['class']} at p >= {float(rule['threshold']):.3f}")
    return [f"cxrscreen: {result.label}  (rule: {how})", format_probabilities(result.probabilities or {}),
            "research use only - not for diagnosis"]


def overlay_rgb(pixels: np.ndarray, heat: np.ndarray, lines: Sequence[str], *, max_side: int = SC_MAX_SIDE
                ) -> np.ndarray:
    """RGB uint8 picture: the X-ray (reduced to ``max_side``) with the heatmap, and a caption band above it
    (the text never covers the image)."""
    import cv2

    from cxrscreen.explain.overlay import overlay, with_band

    h, w = pixels.shape
    f = min(1.0, max_side / max(h, w))
    if f < 1.0:
        size = (max(1, round(w * f)), max(1, round(h * f)))
        pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
        heat = cv2.resize(heat.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    img = with_band(overlay(pixels, heat), list(lines), where="top")  # the CLI heatmaps' caption band
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def sc_pixels(result: PredictionResult, pixels: np.ndarray | None, *, max_side: int = SC_MAX_SIDE
              ) -> np.ndarray | None:
    """The RGB uint8 picture of a result's Secondary Capture, None when there is none to show: the task
    drawer's picture when the result carries one (`predict --heatmap` drew it: the same picture as the PNG,
    reduced to ``max_side``, never enlarged), else the heatmap overlay on ``pixels`` with `caption_lines`."""
    import cv2

    if result.probabilities is None:
        return None
    if result.picture is not None:
        img = result.picture
        h, w = img.shape[:2]
        f = min(1.0, max_side / max(h, w))
        if f < 1.0:
            img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if result.heatmap_array is None or pixels is None:
        return None
    return overlay_rgb(pixels, result.heatmap_array, caption_lines(result), max_side=max_side)


def build_sc(result: PredictionResult, model: ModelInfo, pixels: np.ndarray | None) -> Any:
    """The Secondary Capture (RGB) of the heatmap overlay with class and probabilities (`sc_pixels`), in its
    own series of the source's study. ``pixels``: the X-ray as read (float32 (H, W) in [0, 1], the heatmap's
    grid; unused when the result carries the drawer's picture)."""
    from highdicom.sc import SCImage

    ident = result.dicom
    if ident is None or ident.header is None:
        raise CXRError("no DICOM source: SR and Secondary Capture are written for DICOM inputs only", result.path)
    rgb = sc_pixels(result, pixels)
    if rgb is None:
        raise CXRError("no heatmap to write as a Secondary Capture", result.path)
    src = ident.header
    orientation = src.get("PatientOrientation")
    orient = tuple(str(v) for v in orientation) if orientation is not None and len(orientation) == 2 else ("L", "F")
    sc = SCImage.from_ref_dataset(
        ref_dataset=src, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=orient,
        series_instance_uid=derived_uid(ident.study_instance_uid, model.weights_sha256, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(ident.sop_instance_uid, model.weights_sha256, "sc"),
        instance_number=1, manufacturer=MANUFACTURER,
        series_description=SC_SERIES_DESCRIPTION,
        contributing_equipment=[_contributing_equipment(model)])
    sc.SourceImageSequence = _source_image_sequence(ident)
    if not sc.get("BodyPartExamined"):
        sc.BodyPartExamined = "CHEST"  # tells validators that Laterality (General Series, 2C) does not apply
    sc.BurnedInAnnotation = "YES"  # the caption band holds text
    sc.DerivationDescription = ("cxrscreen overlay of the source image (Grad-CAM heatmap, or a detector's boxes); "
                                "research use only")
    return sc


def _source_image_sequence(ident: Any) -> Any:
    from pydicom import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    item = Dataset()
    item.ReferencedSOPClassUID = ident.sop_class_uid
    item.ReferencedSOPInstanceUID = ident.sop_instance_uid
    return DicomSequence([item])


def build_outputs(result: PredictionResult, model: ModelInfo, pixels: np.ndarray | None) -> list[Any]:
    """[SR] or [SR, SC] (the SC when the result has a picture to show: `sc_pixels`)."""
    out = [build_sr(result, model)]
    if result.probabilities is not None and (result.picture is not None
                                             or (result.heatmap_array is not None and pixels is not None)):
        out.append(build_sc(result, model, pixels))
    return out


def folder_store(out_dir: str | Path) -> Callable[[Sequence[Any]], list[Path]]:
    """A store that writes each dataset to ``out_dir/<SOPInstanceUID>.dcm`` (folders created)."""
    root = Path(out_dir)

    def store(datasets: Sequence[Any]) -> list[Path]:
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for ds in datasets:
            p = root / f"{ds.SOPInstanceUID}.dcm"
            try:
                ds.save_as(p, enforce_file_format=True)
            except OSError as exc:
                raise CXRError(f"cannot write DICOM output ({exc.strerror or exc})", p) from exc
            paths.append(p)
        return paths

    return store


class DicomWriter:
    """Writes an SR (and, with a heatmap, an SC) for every DICOM input's result through ``store``
    (e.g. `folder_store(DIR)` or a STOW-RS upload). ``pixels_of(result)`` gives the X-ray pixels the heatmap
    lies on (None: no SC). Results without a DICOM source or with an error are skipped; `written` lists
    (source path, [SOP Instance UIDs]) and `errors` (path, problem) for outputs that could not be built."""

    def __init__(self, run: Any, store: Callable[[Sequence[Any]], Any],
                 pixels_of: Callable[[PredictionResult], np.ndarray | None] | None = None) -> None:
        self.model = ModelInfo.of_run(run)
        self.store = store
        self.pixels_of = pixels_of or (lambda r: None)
        self.written: list[tuple[str, list[str]]] = []
        self.errors: list[tuple[str, str]] = []

    def open(self) -> None:
        pass

    def write(self, results: Sequence[PredictionResult]) -> None:
        for r in results:
            if r.error or r.dicom is None:
                continue
            try:
                datasets = build_outputs(r, self.model, self.pixels_of(r))
                self.store(datasets)
            except CXRError as exc:
                self.errors.append((r.path, exc.problem))
                continue
            self.written.append((r.path, [str(ds.SOPInstanceUID) for ds in datasets]))

    def close(self) -> None:
        pass
