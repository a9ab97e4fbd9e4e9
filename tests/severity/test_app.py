"""The API with severity: fields when asked, none for a flagged image, 422 without a regressor."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from fastapi.testclient import TestClient

from cxrscreen.runs.run_dir import LoadedRun
from cxrscreen.serving import create_app
from tests.conftest import synthetic_cxr


class RejectAll:
    def flags(self, xray: Any) -> list[str]:
        return ["not a chest X-ray"]


def _png() -> bytes:
    ok, buf = cv2.imencode(".png", (synthetic_cxr(120, 100, lesion=(50, 30)) * 255).astype(np.uint8))
    assert ok
    return buf.tobytes()


def _post(client: TestClient, **params: Any) -> Any:
    return client.post("/api/predict", params=params, files={"file": ("c.png", _png(), "image/png")})


def test_api_severity(sev_run: LoadedRun) -> None:
    from cxrscreen.runs.decision import DecisionRule

    client = TestClient(create_app(sev_run))
    client.app.state.service.predictor.rule = DecisionRule(threshold=0.0)  # every image called covid
    d = _post(client, severity="true", heatmap="true").json()
    assert d["class"] == "covid" and {"geographic_extent", "opacity", "per_lung", "zones"} <= set(d["severity"])
    assert d["heatmap_png_base64"]
    assert "severity" not in _post(client).json()  # only when asked
    assert client.get("/api/model").json()["severity"]["features"]["backbone"] == "model"
    flagged = TestClient(create_app(sev_run, gate=RejectAll()))
    f = _post(flagged, severity="true").json()
    assert f["class"] is None and f["severity"] is None


def test_api_severity_without_regressor_is_422(tmp_path: Any) -> None:
    import shutil

    from cxrscreen.predict.predictor import default_model_dir
    from cxrscreen.runs.run_dir import load_run

    d = tmp_path / "plain"
    shutil.copytree(default_model_dir(), d, ignore=shutil.ignore_patterns("severity.*"))
    client = TestClient(create_app(load_run(d)))
    assert client.get("/api/model").json()["severity"] is None
    r = _post(client, severity="true")
    assert r.status_code == 422 and "no severity regressor" in r.json()["error"]
