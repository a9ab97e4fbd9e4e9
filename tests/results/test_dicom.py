"""DICOM output without a PACS: the SR (TID 1500) and the heatmap Secondary Capture from synthetic DX files,
read back with highdicom, validated with dciodvfy where installed, and `predict --dicom-out`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.errors import CXRError
from cxrscreen.io.xray import read_xray
from cxrscreen.results.dicom import MANUFACTURER, ModelInfo, build_sc, build_sr, derived_uid
from cxrscreen.results.result import PredictionResult
from tests.cli.test_predict import lenient_model  # noqa: F401 (fixture)
from tests.conftest import synthetic_cxr
from tests.dicom_fixtures import write_dx

MODEL = ModelInfo(name="cxrscreen test", version="0.1.0 weights-sha256:ab12", weights_sha256="ab12",
                  arch="tf_efficientnet_lite0", classes=("covid", "normal", "pneumonia"))
PROBS = {"covid": 0.625, "normal": 0.25, "pneumonia": 0.125}


def _result(path: Path, **kw: object) -> PredictionResult:
    x = read_xray(path)
    base = dict(path=str(path), label="covid", probabilities=dict(PROBS),
                decision={"rule": "operating_point", "class": "covid", "threshold": 0.4}, dicom=x.dicom,
                heatmap_array=np.linspace(0, 1, x.pixels.size, dtype=np.float32).reshape(x.pixels.shape))
    base.update(kw)
    return PredictionResult(**base)  # type: ignore[arg-type]


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's 'Error' lines for a file (the test skips where dciodvfy is not installed)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("mono1", [False, True])
def test_sr_reads_back_with_codes_evidence_and_flags(tmp_path: Path, mono1: bool) -> None:
    src = write_dx(tmp_path / "dx.dcm", synthetic_cxr(220, 200, seed=1), monochrome1=mono1)
    res = _result(src, severity={"geographic_extent": 3.25, "opacity": 2.5, "per_lung": {"right": 1.5, "left": 1.75}})
    sr = build_sr(res, MODEL)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    back = hd.sr.srread(tmp_path / "sr.dcm")
    source = pydicom.dcmread(src)
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.PatientID == source.PatientID and back.Manufacturer == MANUFACTURER
    assert (back.CompletionFlag, back.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert "research use only, not for diagnosis" in back.SeriesDescription
    assert back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert any(s.CodingSchemeDesignator == "99CXRSCREEN" for s in back.CodingSchemeIdentificationSequence)
    groups = back.content.get_image_measurement_groups()
    found = {}
    for g in groups:
        code = (g.finding_type.value, g.finding_type.scheme_designator)
        ms = {m.name.value: m for m in g.get_measurements()}
        prob = ms["122157"]
        assert prob.unit.value == "1" and prob.unit.scheme_designator == "UCUM"
        assert prob.referenced_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
        presence = {q.name.value: q.value.value for q in g.get_qualitative_evaluations()}["121052"]
        found[code] = (float(prob.value), presence, set(ms))
        assert g.finding_sites[0].value.value == "39607008"
    assert found[("840539006", "SCT")][:2] == (0.625, "52101004")
    assert found[("17621005", "SCT")][:2] == (0.25, "272519000")
    assert found[("233604007", "SCT")][:2] == (0.125, "272519000")
    assert {"THRESHOLD", "GEO_EXTENT", "OPACITY"} <= found[("840539006", "SCT")][2]


def test_withheld_result_is_a_partial_sr_without_probabilities(tmp_path: Path) -> None:
    src = write_dx(tmp_path / "dx.dcm", synthetic_cxr(200, 200))
    res = _result(src, label=None, probabilities=None, flags=["blank image"], heatmap_array=None)
    build_sr(res, MODEL).save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    back = hd.sr.srread(tmp_path / "sr.dcm")
    assert back.CompletionFlag == "PARTIAL"
    assert all(not g.get_measurements() for g in back.content.get_image_measurement_groups())
    with pytest.raises(CXRError, match="no heatmap"):
        build_sc(res, MODEL, read_xray(src).pixels)


def test_sc_is_the_overlay_in_its_own_series_referencing_the_source(tmp_path: Path) -> None:
    src = write_dx(tmp_path / "dx.dcm", synthetic_cxr(300, 240, seed=2), monochrome1=True)
    res = _result(src)
    sc = build_sc(res, MODEL, read_xray(src).pixels)
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "sc.dcm") == []
    back = pydicom.dcmread(tmp_path / "sc.dcm")
    source = pydicom.dcmread(src)
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID not in (source.SeriesInstanceUID, build_sr(res, MODEL).SeriesInstanceUID)
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert back.PhotometricInterpretation == "RGB" and back.Columns == 240 and back.Rows > 300  # caption band above
    assert "research use only" in back.SeriesDescription


def test_uids_are_stable_for_the_same_input_and_model(tmp_path: Path) -> None:
    src = write_dx(tmp_path / "dx.dcm", synthetic_cxr(200, 200))
    a, b = build_sr(_result(src), MODEL), build_sr(_result(src), MODEL)
    assert a.SOPInstanceUID == b.SOPInstanceUID == derived_uid(str(pydicom.dcmread(src).SOPInstanceUID), "ab12", "sr")
    other = ModelInfo(**{**MODEL.__dict__, "weights_sha256": "cd34"})
    assert build_sr(_result(src), other).SOPInstanceUID != a.SOPInstanceUID


def test_predict_dicom_out_writes_sr_and_sc(tmp_path: Path, lenient_model: Path) -> None:  # noqa: F811
    dx = write_dx(tmp_path / "in" / "dx.dcm", synthetic_cxr(260, 240, seed=3), monochrome1=True)
    png = tmp_path / "in" / "plain.png"
    import cv2

    cv2.imwrite(str(png), (synthetic_cxr(200, 200, seed=4) * 255).astype(np.uint8))
    res = CliRunner().invoke(app, ["predict", str(dx), str(png), "--model", str(lenient_model), "--json",
                                   "--dicom-out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    rows = {r["path"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert rows[str(dx)]["dicom"]["sop_instance_uid"] == str(pydicom.dcmread(dx).SOPInstanceUID)
    assert "plain.png: no DICOM output" in res.stderr
    written = sorted(pydicom.dcmread(p).Modality for p in (tmp_path / "out").iterdir())
    assert written == ["OT", "SR"]
    sr = next(hd.sr.srread(p) for p in (tmp_path / "out").iterdir() if pydicom.dcmread(p).Modality == "SR")
    probs = {g.finding_type.meaning: float(g.get_measurements()[0].value)
             for g in sr.content.get_image_measurement_groups()}
    want = rows[str(dx)]["probabilities"]
    assert probs == pytest.approx({"COVID-19": want["covid"], "Normal": want["normal"],
                                   "Pneumonia": want["pneumonia"]}, abs=1e-12)


def test_only_frontal_dx_cr_from_others_are_screened(tmp_path: Path) -> None:
    def ident(**kw: object) -> object:
        return read_xray(write_dx(tmp_path / f"{len(list(tmp_path.iterdir()))}.dcm", synthetic_cxr(64, 64),
                                  **kw)).dicom

    assert ident().screenable(MANUFACTURER) is None
    assert "frontal" in ident(view="LL").screenable(MANUFACTURER)
    assert "cxrscreen" in ident(manufacturer=MANUFACTURER).screenable(MANUFACTURER)
    sr_ident = read_xray(write_dx(tmp_path / "dx.dcm", synthetic_cxr(64, 64))).dicom
    sr_ident.sop_class_uid = "1.2.840.10008.5.1.4.1.1.88.34"
    assert "not a DX/CR image" in sr_ident.screenable(MANUFACTURER)


def test_heatmap_and_dicom_out_compute_grad_cam_once(tmp_path: Path, lenient_model: Path,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With --heatmap and --dicom-out the Secondary Capture is the task drawer's picture: one Grad-CAM per image
    (it was computed a second time for the SC)."""
    from cxrscreen.explain.cam import Explainer

    calls: list[str] = []
    real = Explainer.cam

    def counted(self: Explainer, image_u8: np.ndarray, target: str) -> np.ndarray:
        calls.append(target)
        return real(self, image_u8, target)

    monkeypatch.setattr(Explainer, "cam", counted)
    dx = write_dx(tmp_path / "in" / "dx.dcm", synthetic_cxr(260, 240, seed=3))
    res = CliRunner().invoke(app, ["predict", str(dx), "--model", str(lenient_model), "--json",
                                   "--heatmap", str(tmp_path / "png"), "--dicom-out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    sc = next(pydicom.dcmread(p) for p in (tmp_path / "out").iterdir() if pydicom.dcmread(p).Modality == "OT")
    import cv2

    png = cv2.imread(str(next((tmp_path / "png").iterdir())))
    assert (sc.Rows, sc.Columns) == png.shape[:2]  # the drawer's picture (caption band included)
    assert np.array_equal(sc.pixel_array, png[..., ::-1])
