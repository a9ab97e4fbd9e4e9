"""The web app on a tiny untrained model: page, predict, heatmap, errors, limits, gate, model info."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from cxrscreen.models.registry import create_model
from cxrscreen.runs import LoadedRun, load_run, save_weights, write_config
from cxrscreen.serving import create_app
from cxrscreen.transforms import PreprocessConfig

CLASSES = ["covid", "normal", "pneumonia"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> LoadedRun:
    """A tiny untrained mobilenet_v3_small run directory with a model card."""
    d = tmp_path_factory.mktemp("run")
    model = create_model("mobilenet_v3_small", num_classes=3)
    sha = save_weights(model, d)
    write_config(d, {"arch": "mobilenet_v3_small", "kind": "classifier", "classes": CLASSES,
                     "preprocess": PreprocessConfig(image_size=64).to_dict(), "weights_sha256": sha})
    (d / "model_card.json").write_text(json.dumps({"name": "test model", "intended_use": "tests"}))
    return load_run(d)


@pytest.fixture(scope="module")
def client(run: LoadedRun) -> TestClient:
    return TestClient(create_app(run))


def png_bytes(h: int = 80, w: int = 120, seed: int = 0) -> bytes:
    """A synthetic grey PNG (never a real patient image)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w)) * 255).astype(np.uint8)
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 5, 30, -1)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def post(client: TestClient, data: bytes, name: str = "chest.png", **params: Any) -> Any:
    return client.post("/api/predict", params=params, files={"file": (name, data, "image/png")})


def test_page_has_form_notice_and_no_external_resources(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'type="file"' in html and "<button" in html
    assert "Research use only: not a medical device" in html
    assert "api/predict?heatmap=true" in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_predict_png(client: TestClient) -> None:
    r = post(client, png_bytes())
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["path"] == "chest.png" and d["error"] is None and d["flags"] == []
    assert d["class"] in CLASSES
    assert list(d["probabilities"]) == CLASSES
    assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "heatmap_png_base64" not in d


def test_predict_heatmap_has_input_size(client: TestClient) -> None:
    r = post(client, png_bytes(80, 120), heatmap="true")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["heatmap_target"] == d["class"]
    raw = base64.b64decode(d["heatmap_png_base64"])
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (80, 120, 3)


def test_heatmap_target_and_unknown_target(client: TestClient) -> None:
    r = post(client, png_bytes(), heatmap="true", target="pneumonia")
    assert r.status_code == 200 and r.json()["heatmap_target"] == "pneumonia"
    r = post(client, png_bytes(), heatmap="true", target="flu")
    assert r.status_code == 422
    assert "flu" in r.json()["error"] and r.json()["path"] == "chest.png"


def test_text_file_is_422_naming_the_file(client: TestClient) -> None:
    r = post(client, b"these are my notes, not an image\n", name="notes.txt")
    assert r.status_code == 422
    d = r.json()
    assert d["path"] == "notes.txt"
    assert "notes.txt" in d["error"] and "not a recognised image" in d["error"]


def test_empty_file_is_422(client: TestClient) -> None:
    r = post(client, b"", name="empty.png")
    assert r.status_code == 422 and "empty.png" in r.json()["error"]


def test_oversize_upload_is_413(run: LoadedRun) -> None:
    small = TestClient(create_app(run, max_upload_bytes=1000))
    data = png_bytes()
    assert len(data) > 1000
    r = post(small, data, name="big.png")
    assert r.status_code == 413
    assert r.json()["path"] == "big.png" and "1,000" in r.json()["error"]
    # a body far over the limit is refused from its Content-Length, before it is parsed
    r = post(small, b"\0" * 200_000, name="huge.png")
    assert r.status_code == 413 and "error" in r.json()
    assert post(small, b"x" * 500, name="tiny.txt").status_code == 422  # under the limit: decoded


def test_oversize_streamed_body_without_length_is_413(run: LoadedRun) -> None:
    small = TestClient(create_app(run, max_upload_bytes=1000))
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.png\"\r\n\r\n"
            + b"\0" * 200_000 + b"\r\n--b--\r\n")
    r = small.post("/api/predict", content=iter([body[:1000], body[1000:]]),
                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.status_code == 413 and "upload limit of 1,000" in r.json()["error"]


def test_model_info(client: TestClient, run: LoadedRun) -> None:
    d = client.get("/api/model").json()
    assert {"arch", "classes", "preprocess", "weights_sha256", "temperature", "operating_point",
            "model_card"} <= set(d)
    assert d["arch"] == "mobilenet_v3_small" and d["classes"] == CLASSES
    assert d["preprocess"]["image_size"] == 64
    assert d["weights_sha256"] == run.config["weights_sha256"] and d["temperature"] == 1.0
    assert d["model_card"] == {"name": "test model", "intended_use": "tests"}


class RejectAll:
    """A gate that flags every input."""

    def flags(self, xray: Any, image: np.ndarray) -> list[str]:
        return ["not a chest X-ray"]


def test_gate_flag_withholds_class(run: LoadedRun) -> None:
    gated = TestClient(create_app(run, gate=RejectAll()))
    r = post(gated, png_bytes(), heatmap="true")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["class"] is None and d["flags"] == ["not a chest X-ray"]
    probs = d["probabilities"]
    assert d["heatmap_target"] == max(probs, key=probs.get)
    assert d["heatmap_png_base64"]


def test_concurrent_heatmaps(client: TestClient) -> None:
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda i: post(client, png_bytes(64 + 8 * i, 96, seed=i), heatmap="true"),
                           range(6)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    for i, r in enumerate(rs):
        raw = base64.b64decode(r.json()["heatmap_png_base64"])
        assert cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE).shape == (64 + 8 * i, 96)
