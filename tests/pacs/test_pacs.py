"""`cxrscreen pacs` against a real Orthanc (tests/orthanc.py): DX DICOMs made from real chest X-rays
(12-bit, MONOCHROME1 and MONOCHROME2) are stored, screened, and the SR + SC read back from the PACS."""

from __future__ import annotations

import datetime
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from cxrscreen.cli import app
from cxrscreen.pacs.client import Credentials, PacsClient
from tests.conftest import read_real_manifest
from tests.dicom_fixtures import dx_dataset
from tests.orthanc import PASSWORD, USER, OrthancServer, orthanc, orthanc_server  # noqa: F401 (fixtures)
from tests.results.test_dicom import dciodvfy_errors

REPO = Path(__file__).resolve().parents[2]


def real_images(data_dir: Path, n: int) -> list[np.ndarray]:
    """n real X-rays (all frontal, see the data README; one per class in turn) as float [0, 1]."""
    df = read_real_manifest(data_dir)
    rows = [df[df["label"] == c].iloc[i // 3] for i, c in zip(range(n), ["covid", "normal", "pneumonia"] * n,
                                                                  strict=False)]
    return [cv2.imread(str(data_dir / r["image"]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0 for r in rows]


def client(server: OrthancServer) -> PacsClient:
    return PacsClient(server.dicomweb_url, creds=Credentials(USER, PASSWORD))


def store_study(server: OrthancServer, tmp: Path, pixels: np.ndarray, *, monochrome1: bool, name: str
                ) -> tuple[str, Path]:
    """Store one DX study in Orthanc; (its Study Instance UID, the same file written locally)."""
    ds = dx_dataset(pixels, monochrome1=monochrome1)
    path = tmp / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    client(server).store([pydicom.dcmread(path)])
    return str(ds.StudyInstanceUID), path


def pacs_cli(server: OrthancServer, *args: str, monkeypatch: pytest.MonkeyPatch) -> object:
    monkeypatch.setenv("CXRSCREEN_PACS_USER", USER)
    monkeypatch.setenv("CXRSCREEN_PACS_PASSWORD", PASSWORD)
    return CliRunner().invoke(app, ["pacs", "run", "--url", server.dicomweb_url, *args])


def own_objects(server: OrthancServer, study: str, tmp: Path) -> dict[str, Path]:
    """The study's SR and SC (by modality) fetched back through WADO-RS into files."""
    c = client(server)
    out = {}
    for ref in c.instances(study):
        if ref.sop_class in ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"):
            ds = pydicom.dcmread(io.BytesIO(c.retrieve(ref)))
            path = tmp / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.setdefault(ds.Modality, path)
    return out


def test_run_stores_sr_and_sc_in_the_study_and_a_second_run_stores_nothing(
        orthanc: OrthancServer, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    images = real_images(data_dir, 2)
    studies = [store_study(orthanc, tmp_path, img, monochrome1=i == 0, name=f"s{i}") for i, img in enumerate(images)]
    res = pacs_cli(orthanc, *sum((["--study", uid] for uid, _ in studies), []), monkeypatch=monkeypatch)
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [(x["screened"], x["stored"], x["ok"]) for x in lines] == [(1, 2, True)] * 2
    for uid, _ in studies:  # no study UID, patient name or ID in anything printed
        assert uid not in res.output and "P0001" not in res.output and "Test^Patient" not in res.output
    for uid, local in studies:
        objs = own_objects(orthanc, uid, tmp_path)
        assert set(objs) == {"SR", "OT"}
        for p in objs.values():
            assert dciodvfy_errors(p) == [], p
        source = pydicom.dcmread(local)
        sr = hd.sr.srread(objs["SR"])
        assert sr.StudyInstanceUID == uid and sr.SeriesInstanceUID != source.SeriesInstanceUID
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert evidence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        got = {g.finding_type.meaning: float(g.get_measurements()[0].value)
               for g in sr.content.get_image_measurement_groups()}
        pred = CliRunner().invoke(app, ["predict", str(local), "--json"])
        want = json.loads(pred.stdout)["probabilities"]
        assert got == pytest.approx({"COVID-19": want["covid"], "Normal": want["normal"],
                                     "Pneumonia": want["pneumonia"]}, abs=1e-12)
        sc = pydicom.dcmread(objs["OT"])
        assert sc.StudyInstanceUID == uid and sc.SourceImageSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
    c = client(orthanc)  # --since: QIDO by StudyDate range (the test studies are of 2026-01-01)
    assert {uid for uid, _ in studies} <= set(c.studies(since=datetime.date(2026, 1, 1)))
    assert not {uid for uid, _ in studies} & set(c.studies(since=datetime.date(2026, 1, 2)))
    again = pacs_cli(orthanc, *sum((["--study", uid] for uid, _ in studies), []), monkeypatch=monkeypatch)
    assert again.exit_code == 0, again.output
    assert [(x["stored"], x["already_done"]) for x in map(json.loads, again.stdout.splitlines())] == [(0, 1)] * 2
    assert all(len(client(orthanc).instances(uid)) == 3 for uid, _ in studies)


def test_a_study_with_a_corrupt_instance_is_reported_and_the_others_are_done(
        orthanc: OrthancServer, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    good_img, bad_img = real_images(data_dir, 2)
    bad = dx_dataset(bad_img)
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 3]  # truncated pixel data: cannot be decoded
    client(orthanc).store([bad])
    good_uid, _ = store_study(orthanc, tmp_path, good_img, monochrome1=False, name="good")
    res = pacs_cli(orthanc, "--study", str(bad.StudyInstanceUID), "--study", good_uid, monkeypatch=monkeypatch)
    assert res.exit_code == 1, res.output
    first, second = (json.loads(x) for x in res.stdout.splitlines())
    assert not first["ok"] and first["stored"] == 0 and first["errors"][0].startswith("instance 1: cannot decode")
    assert second["ok"] and second["stored"] == 2
    assert "error:" in res.stderr and "1 studies failed" in res.stderr


def test_watch_picks_up_a_study_stored_after_it_started(
        orthanc: OrthancServer, data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    state = tmp_path / "watch.json"
    env = {**orthanc.env, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    # started from this thread, the watcher lives in Orthanc's network namespace too
    proc = subprocess.Popen([sys.executable, "-m", "cxrscreen.cli", "pacs", "watch", "--url", orthanc.dicomweb_url,
                             "--state", str(state), "--interval", "0.5", "--max-seconds", "240"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not state.exists():  # written once the model is loaded and the feed's position is known
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.2)
        uid, _ = store_study(orthanc, tmp_path, real_images(data_dir, 1)[0], monochrome1=True, name="late")
        deadline = time.monotonic() + 120
        while not any(json.loads(x).get("stored") for x in list(lines)):
            assert proc.poll() is None and time.monotonic() < deadline, (lines, proc.stderr.read())  # type: ignore[union-attr]
            time.sleep(0.5)
        assert len(client(orthanc).instances(uid)) == 3
        assert json.loads(state.read_text())["last_change"] > 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

