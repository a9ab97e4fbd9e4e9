"""FastAPI app: the upload page, `/api/predict` (class, probabilities, flags, optional Grad-CAM overlay),
`/api/model` and `/healthz`.

Decoding and inference are CPU-bound and run in the threadpool; calls into the model are serialised
by one lock because the Grad-CAM hooks are not thread-safe.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import cv2
import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxrscreen.errors import CXRError
from cxrscreen.io import read_xray_bytes
from cxrscreen.predict import Predictor, Prepared, format_probabilities, load_model
from cxrscreen.runs import LoadedRun
from cxrscreen.serving.page import INDEX_HTML

if TYPE_CHECKING:  # cxrscreen.explain imports pytorch-grad-cam (seconds): loaded on the first heatmap
    from cxrscreen.explain import Explainer

MODEL_CARD_FILE = "model_card.json"
_MULTIPART_SLACK = 64 * 1024  # room for the multipart boundaries and part headers around the file


def _error(status: int, message: str, path: str | None) -> JSONResponse:
    """The API's error body: {"error": message, "path": file name or null}."""
    return JSONResponse({"error": message, "path": path}, status_code=status)


class _BodyTooLarge(HTTPException):
    """Raised while a request body is streaming in, once it passes the limit."""

    def __init__(self, max_upload_bytes: int) -> None:
        super().__init__(413, f"request body is over the upload limit of {max_upload_bytes:,} bytes")


class _BodyLimit:
    """ASGI middleware refusing a request body over `max_upload_bytes` (plus room for the multipart
    framing) with 413, by its Content-Length or, without one, as it streams in: a huge upload is never
    parsed or spooled to disk."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.limit = max_upload_bytes + _MULTIPART_SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            msg = f"request body is {int(length):,} bytes, over the upload limit of {self.max_upload_bytes:,}"
            await _error(413, msg, None)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge(self.max_upload_bytes)
            return message

        await self.app(scope, counted, send)


def _read_model_card(run_dir: Path) -> dict[str, Any] | None:
    """The run's model_card.json, or None when it has none; CXRError when it is not valid JSON."""
    path = Path(run_dir) / MODEL_CARD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CXRError(f"model card is not valid JSON ({exc})", path) from exc


def _overlay_png(prep: Prepared, result: dict[str, Any], target: str, heat: np.ndarray) -> str:
    """The X-ray with its heatmap, class and probabilities drawn on, as base64 PNG (original size)."""
    from cxrscreen.explain import draw_text, overlay

    img = overlay(prep.xray.pixels, heat)
    label = result["class"] or "no diagnosis"
    draw_text(img, [f"{label}  (heatmap: {target})", format_probabilities(result["probabilities"])])
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise CXRError("could not encode the heatmap PNG", prep.path)
    return base64.b64encode(buf.tobytes()).decode("ascii")


class _Service:
    """The loaded model with its predictor and (created on first use) explainer, behind one lock."""

    def __init__(self, run: LoadedRun, gate: Any) -> None:
        self.run = run
        self.predictor = Predictor(run, gate=gate)
        self.lock = threading.Lock()
        self._explainer: Explainer | None = None

    def analyse(self, data: bytes, name: str, heatmap: bool, target: str | None) -> dict[str, Any]:
        """Decode, predict and optionally explain one upload (blocking: call it in a worker thread)."""
        xray = read_xray_bytes(data, name=name)
        prep = self.predictor.prepare(xray)
        with self.lock:
            result = self.predictor.predict_prepared([prep])[0]
            if not heatmap:
                return result
            if self._explainer is None:
                from cxrscreen.explain import Explainer

                self._explainer = Explainer(self.run)
            probs = result["probabilities"]
            target = target or result["class"] or max(probs, key=probs.get)
            heat = self._explainer.heatmap(prep, target)
        result["heatmap_target"] = target
        result["heatmap_png_base64"] = _overlay_png(prep, result, target, heat)
        return result


def create_app(run: LoadedRun, *, gate: Any = None, max_upload_bytes: int = 30_000_000) -> FastAPI:
    """The web app for one loaded model; `gate` (optional) has `flags(xray, image) -> list[str]` and
    withholds the class of an input it flags. Uploads over `max_upload_bytes` are refused with 413."""
    service = _Service(run, gate)
    model_card = _read_model_card(run.run_dir)
    app = FastAPI(title="cxrscreen", version="0.1.0",
                  description="Chest X-ray screening (covid / normal / pneumonia). "
                              "Research use only: not a medical device.")
    app.add_middleware(_BodyLimit, max_upload_bytes=max_upload_bytes)

    @app.exception_handler(_BodyTooLarge)
    async def body_too_large(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return _error(413, str(exc.detail), None)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        """The upload page."""
        return INDEX_HTML

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness check."""
        return {"status": "ok"}

    @app.get("/api/model")
    async def model_info() -> dict[str, Any]:
        """What is being served: architecture, classes, preprocessing, weights hash, calibration, card."""
        return {
            "arch": run.arch,
            "kind": run.config.get("kind", "classifier"),
            "classes": run.classes,
            "preprocess": run.preprocess.to_dict(),
            "weights_sha256": run.config.get("weights_sha256"),
            "temperature": run.temperature,
            "operating_point": run.config.get("operating_point"),
            "model_card": model_card,
        }

    @app.post("/api/predict", response_model=None)
    async def predict(
        file: Annotated[UploadFile, File(description="a chest X-ray: PNG, JPEG, TIFF, BMP or DICOM")],
        heatmap: Annotated[bool, Query(description="add a Grad-CAM overlay PNG (base64)")] = False,
        target: Annotated[str | None, Query(description="class the heatmap explains (default: the "
                                                        "predicted class, else the most probable)")] = None,
    ) -> dict[str, Any] | JSONResponse:
        """Class, probability of each class, and flags for one uploaded image."""
        name = file.filename or "<upload>"
        if target is not None and target not in run.classes:
            return _error(422, f"unknown target class {target!r}; classes: {', '.join(run.classes)}", name)
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return _error(413, f"{name}: file is over the upload limit of {max_upload_bytes:,} bytes", name)
        try:
            return await run_in_threadpool(service.analyse, data, name, heatmap, target)
        except CXRError as exc:
            return _error(422, str(exc), name)

    return app


def _default_gate(run: LoadedRun) -> Any:
    """The project's input gate for this run when cxrscreen.gate exists, else None (as the CLI does)."""
    try:
        from cxrscreen.gate import gate_for_run
    except ImportError:
        return None
    return gate_for_run(run)


def serve(model: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load a run directory (or the bundled model when None) and serve the app with uvicorn."""
    import uvicorn

    run = load_model(model)
    uvicorn.run(create_app(run, gate=_default_gate(run)), host=host, port=port)
