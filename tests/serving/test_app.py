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

from cxrscreen.io.xray import MAX_PIXELS
from cxrscreen.models.registry import create_model
from cxrscreen.predict.predictor import Predictor
from cxrscreen.runs.run_dir import LoadedRun, load_run, save_weights, write_config
from cxrscreen.serving import create_app
from cxrscreen.serving.app import MicroBatcher, upload_label
from cxrscreen.transforms.preprocess import PreprocessConfig

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
    assert "How the class is chosen" in html and "d.decision" in html and "covid_threshold" in html


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
            "model_card", "decision", "limits"} <= set(d)
    assert d["decision"] == {"rule": "argmax"}  # no stored operating point
    assert d["limits"]["max_pixels"] == MAX_PIXELS and d["limits"]["max_concurrent_decodes"] >= 1
    assert d["arch"] == "mobilenet_v3_small" and d["classes"] == CLASSES
    assert d["preprocess"]["image_size"] == 64
    assert d["weights_sha256"] == run.config["weights_sha256"] and d["temperature"] == 1.0
    assert d["model_card"] == {"name": "test model", "intended_use": "tests"}


class RejectAll:
    """A gate that flags every input."""

    def flags(self, xray: Any) -> list[str]:
        return ["not a chest X-ray"]


def test_gate_flag_withholds_class_probabilities_and_heatmap(run: LoadedRun) -> None:
    gated = TestClient(create_app(run, gate=RejectAll()))
    r = post(gated, png_bytes(), heatmap="true")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["class"] is None and d["flags"] == ["not a chest X-ray"]
    assert d["probabilities"] is None  # no output of a flagged image reads as a diagnosis
    assert d["heatmap_target"] is None and d["heatmap_png_base64"] is None


def test_concurrent_heatmaps(client: TestClient) -> None:
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda i: post(client, png_bytes(64 + 8 * i, 96, seed=i), heatmap="true"),
                           range(6)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    for i, r in enumerate(rs):
        raw = base64.b64decode(r.json()["heatmap_png_base64"])
        assert cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE).shape == (64 + 8 * i, 96)


# ------------------------------------------------------------------------------------------- hardening


def test_heatmap_has_no_text_drawn_over_the_image(client: TestClient) -> None:
    """The class and probabilities are on the page beside the image; the overlay used to carry them on a
    black band over the top of the X-ray."""
    img = np.full((120, 160), 200, np.uint8)
    ok, buf = cv2.imencode(".png", img)
    r = post(client, buf.tobytes(), heatmap="true")
    over = cv2.imdecode(np.frombuffer(base64.b64decode(r.json()["heatmap_png_base64"]), np.uint8),
                        cv2.IMREAD_GRAYSCALE)
    assert over.shape == (120, 160)
    assert over[:20].mean() > 60, "dark band over the top of the image"


def _grey_rgb_png(h: int, w: int) -> bytes:
    rng = np.random.default_rng(3)
    grey = (rng.random((h, w)) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", np.repeat(grey[..., None], 3, axis=2))
    assert ok
    return buf.tobytes()


def test_upload_name_is_a_label_never_a_path(run: LoadedRun, tmp_path: Any) -> None:
    """An upload named after an existing server file gets exactly the result of the same bytes under
    another name: the file is never opened, so it can change nothing and reveal nothing."""
    from skimage import data

    from cxrscreen.gate.model import gate_for_run

    gated = TestClient(create_app(run, gate=gate_for_run(run)))
    coffee = data.coffee()  # a colour photo on the server, 400 x 600
    server_file = tmp_path / "coffee.png"
    cv2.imwrite(str(server_file), coffee)
    upload = _grey_rgb_png(*coffee.shape[:2])
    named = post(gated, upload, name=str(server_file)).json()
    neutral = post(gated, upload, name="upload.png").json()
    assert named["path"] == "coffee.png"  # a label: the last component of the client's name
    assert {k: v for k, v in named.items() if k != "path"} == {k: v for k, v in neutral.items() if k != "path"}
    assert not any(f.startswith("colour picture") for f in named["flags"])


def test_upload_label() -> None:
    assert upload_label("C:\\Users\\me\\chest.png") == "chest.png"
    assert upload_label("../../etc/passwd") == "passwd"
    assert upload_label("a\x1b[31m\nb.png") == "a[31mb.png"
    assert upload_label("") == upload_label(None) == "<upload>"


def test_decodes_at_once_are_bounded(run: LoadedRun, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    import cxrscreen.serving.app as app_mod

    real = app_mod.read_xray_bytes
    active, peak, lock = [0], [0], threading.Lock()
    seen_max_side = []

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        seen_max_side.append(kwargs.get("max_side"))
        try:
            time.sleep(0.05)
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(app_mod, "read_xray_bytes", slow_read)
    bounded = TestClient(create_app(run, max_decodes=2))
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: post(bounded, png_bytes(seed=i)), range(8)))
    assert all(r.status_code == 200 for r in rs)
    assert peak[0] == 2, f"{peak[0]} decodes ran at once"
    assert all(m is not None and m <= 4096 for m in seen_max_side)  # reduced while decoding


def test_huge_png_upload_costs_bounded_memory(run: LoadedRun) -> None:
    """A 48 KB PNG of 7000 x 7000 zeros cost about 1.35 GB of server memory before."""
    import io
    import tracemalloc

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (7000, 7000)).save(buf, format="PNG")
    c = TestClient(create_app(run))
    tracemalloc.start()
    try:
        r = post(c, buf.getvalue(), name="zeros.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 200, r.text
    assert peak < 150e6, f"peak {peak / 1e6:.0f} MB"


def test_concurrent_requests_are_batched_and_equal_sequential(run: LoadedRun) -> None:
    """Probabilities of requests batched into one forward pass, or run beside heatmap requests, equal the
    one-by-one results within 1e-5, and the class exactly (a shared CLAHE object made 1 of 50 concurrent
    heatmap requests 0.07 off)."""
    app = create_app(run, batch_wait_s=0.05)
    c = TestClient(app)
    uploads = [png_bytes(70 + 3 * i, 90 + 2 * i, seed=i) for i in range(16)]
    single = Predictor(run)
    from cxrscreen.io.xray import read_xray_bytes

    expected = [single.predict_xray(read_xray_bytes(u, name="x.png", max_side=2048)).to_dict() for u in uploads]
    with ThreadPoolExecutor(8) as pool:
        got = [r.json() for r in pool.map(lambda i: post(c, uploads[i % 16], **({"heatmap": "true"} if i % 3 == 0
                                                                                else {})), range(48))]
    assert max(app.state.service.batcher.batch_sizes) > 1  # some requests did share a forward pass
    for i, g in enumerate(got):
        e = expected[i % 16]
        assert g["class"] == e["class"] and bool(g.get("heatmap_png_base64")) == (i % 3 == 0)
        for k in CLASSES:
            assert g["probabilities"][k] == pytest.approx(e["probabilities"][k], abs=1e-5)


def test_micro_batcher_limits_batches_and_passes_errors_on() -> None:
    import threading

    seen: list[int] = []
    gate = threading.Event()

    def fn(items: Any) -> list[int]:
        gate.wait(5)
        seen.append(len(items))
        if -1 in items:
            raise ValueError("bad item")
        return [2 * i for i in items]

    b = MicroBatcher(fn, max_batch=3, wait_s=0.01)
    futs = [b.submit(i) for i in range(7)]
    gate.set()
    assert [f.result(5) for f in futs] == [2 * i for i in range(7)]
    assert max(seen) <= 3 and sum(seen) == 7
    with pytest.raises(ValueError, match="bad item"):
        b(-1)
    assert b(5) == 10  # the worker survives an error
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(1)


# ------------------------------------------------------------------------------------------- detectors


def test_served_detector_draws_its_boxes_instead_of_refusing_a_heatmap(tmp_path: Any, monkeypatch: Any) -> None:
    """heatmap=true on a served detector used to answer 422 (the server called Grad-CAM directly); it now
    draws through the task's drawer, as `predict --heatmap` does: the X-ray with its boxes, at input size."""
    from cxrscreen.models.detectors import create_detector
    from cxrscreen.tasks import detection

    arch = "ssdlite320_mobilenet_v3_large"
    sha = save_weights(create_detector(arch, num_classes=3), tmp_path)
    write_config(tmp_path, {"arch": arch, "kind": "detector", "classes": CLASSES,
                            "preprocess": PreprocessConfig(image_size=64).to_dict(), "weights_sha256": sha})
    run = load_run(tmp_path)
    assert not run.task.has_logits and run.task.drawing == "boxes"
    # an untrained SSD finds nothing worth showing: one confident "pneumonia" box in model pixels instead
    found = {"boxes": np.array([[8.0, 8.0, 40.0, 48.0]], np.float32), "labels": np.array([3]),
             "scores": np.array([0.9], np.float32)}
    monkeypatch.setattr(detection, "detect", lambda model, images, **kw: [found for _ in images])
    grey = np.full((120, 160), 200, np.uint8)
    ok, buf = cv2.imencode(".png", grey)
    r = post(TestClient(create_app(run)), buf.tobytes(), heatmap="true")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["class"] == "pneumonia" and [b["class"] for b in d["boxes"]] == ["pneumonia"]
    assert d["heatmap_target"] is None  # boxes explain no one class
    img = cv2.imdecode(np.frombuffer(base64.b64decode(d["heatmap_png_base64"]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (120, 160, 3)
    x0, y0, x1, y1 = (round(v) for v in d["boxes"][0]["box"])
    coloured = np.ptp(img.astype(int), axis=2) > 40  # the grey X-ray has none; a box outline and label do
    assert coloured[y0:y1 + 1, x0:x1 + 1].any() and not coloured[y1 + 3:, x1 + 3:].any()


def test_concurrent_heatmaps_share_grad_cam_passes_and_equal_sequential(run: LoadedRun, monkeypatch: Any) -> None:
    """N heatmap requests at once make fewer than N Grad-CAM passes (each request used to run its own, one after
    another under the model lock), and every picture equals the one its image gets alone."""
    import cxrscreen.explain.cam as cam_module

    passes: list[int] = []

    class CountingGradCAM(cam_module.GradCAM):
        def __call__(self, input_tensor: Any, *args: Any, **kwargs: Any) -> Any:
            passes.append(len(input_tensor))
            return super().__call__(input_tensor, *args, **kwargs)

    monkeypatch.setattr(cam_module, "GradCAM", CountingGradCAM)
    uploads = [png_bytes(64 + 4 * i, 96, seed=20 + i) for i in range(8)]
    alone = TestClient(create_app(run))
    expected = [post(alone, u, heatmap="true").json() for u in uploads]
    assert len(passes) == 8
    passes.clear()
    app = create_app(run, batch_wait_s=1.0, cam_max_batch=4)
    c = TestClient(app)
    with ThreadPoolExecutor(8) as pool:
        got = [r.json() for r in pool.map(lambda u: post(c, u, heatmap="true"), uploads)]
    assert sum(passes) == 8 and len(passes) < 8, passes
    assert max(passes) <= 4  # the Grad-CAM batch is capped
    for g, e in zip(got, expected, strict=True):
        assert g["heatmap_target"] == e["heatmap_target"] and g["heatmap_in_lungs"] == e["heatmap_in_lungs"]
        a, b = (cv2.imdecode(np.frombuffer(base64.b64decode(d["heatmap_png_base64"]), np.uint8), cv2.IMREAD_COLOR)
                for d in (g, e))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
