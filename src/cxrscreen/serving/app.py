"""FastAPI app: the upload page, `/api/predict` (class, probabilities, flags, optional picture drawn by the
model's task: a classifier's Grad-CAM overlay, a detector's boxes),
`/api/model` and `/healthz`.

Each upload is handled in the threadpool: decoded (at most `max_decodes` at once, reduced while decoding
to a long side of at most `DECODE_MAX_SIDE`; the upload's name is a label, never opened), preprocessed,
gated, then its forward pass is batched with the other requests waiting at that moment
(:class:`MicroBatcher`: one forward pass for up to `max_batch` images collected for a few milliseconds).
Heatmap requests are batched the same way a second time: the model's part of their pictures (a classifier's
Grad-CAM, `Drawer.explain`) runs as one forward + backward pass for up to `CAM_MAX_BATCH` of them; each picture
is then drawn outside the model lock, at most `MAX_CONCURRENT_DRAWS` at once (they hold the X-ray at up to
`DECODE_MAX_SIDE`). Forward passes and Grad-CAM passes share one lock because the Grad-CAM hooks see every
forward pass. With the ONNX Runtime engine the class and probabilities come from ONNX Runtime and torch is not
imported until the first heatmap request loads the PyTorch model beside the export (`onnx_engine.drawing_run`);
Grad-CAM then runs on that model under a lock of its own, beside the ONNX forward passes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxrscreen.errors import CXRError
from cxrscreen.explain.overlay import png_base64
from cxrscreen.gate.model import gate_for_run
from cxrscreen.io.xray import MAX_PIXELS, decoded_bytes_estimate, read_xray_bytes
from cxrscreen.predict.onnx_engine import drawing_run, heatmap_problem
from cxrscreen.predict.predictor import Predictor, Prepared
from cxrscreen.results.result import PredictionResult
from cxrscreen.runs.run_dir import LoadedRun
from cxrscreen.serving.page import INDEX_HTML
from cxrscreen.serving.security import BODY_TIMEOUT_S, allowed_hosts_for, release_freed_memory, uvicorn_config
from cxrscreen.serving.security import harden as _harden
from cxrscreen.severity.info import severity_info

if TYPE_CHECKING:  # a classifier's drawer imports pytorch-grad-cam (seconds): made on the first heatmap
    from cxrscreen.tasks.base import Drawer

MODEL_CARD_FILE = "model_card.json"
_MULTIPART_SLACK = 64 * 1024  # room for the multipart boundaries and part headers around the file

MAX_UPLOAD_BYTES = 30_000_000
"""Largest upload accepted (413 above it)."""
DECODE_MAX_SIDE = 2048
"""Uploads are reduced while decoding to a long side of at most this (JPEG by the codec's own scaling):
a 2048 px image is 16 MB as float32, far above any model input, and keeps the heatmap readable."""
MAX_CONCURRENT_DECODES = 2
"""Decodes running at once; the others wait. With the pixel limit (`cxrscreen.io.MAX_PIXELS`, 50 million,
checked from the header) this bounds the decoding memory: measured peaks for a 7000 x 7000 PNG are about
70 MB (8-bit grey), 100 MB (palette), 215 MB (RGB) and 285 MB (16-bit grey) per decode."""
BIG_DECODE_BYTES = 32_000_000
"""Uploads announcing more decoded bytes than this (a 4,000 x 4,000 16-bit image) are decoded one at a time,
apart from the others."""
MAX_BATCH = 16
"""Most images in one batched forward pass."""
BATCH_WAIT_S = 0.004
"""How long the batcher waits for more requests after the first one arrives."""
CAM_MAX_BATCH = 8
"""Most heatmap requests in one Grad-CAM forward + backward pass (bounds its memory)."""
MAX_CONCURRENT_DRAWS = 2
"""Pictures drawn at once (heat map to the original size, share of heat in the lungs, overlay, PNG)."""


def upload_label(filename: str | None) -> str:
    """The label of an upload: the last component of the name the client sent, control characters
    dropped, at most 200 characters; never used as a path."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:200]
    return name or "<upload>"


class MicroBatcher:
    """Collects single items from many threads and runs `fn` on them as one batch.

    `submit(item)` returns a Future. A worker thread takes the first waiting item, then whatever else
    arrives within `wait_s` (up to `max_batch`), calls `fn(items)` (which returns one output per item, in
    order) while holding `lock`, and resolves the futures. An exception in `fn` is set on every future of
    that batch.
    """

    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = MAX_BATCH,
                 wait_s: float = BATCH_WAIT_S, lock: threading.Lock | None = None) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.lock = lock or threading.Lock()
        self._cond = threading.Condition()
        self._queue: list[tuple[Any, Future]] = []
        self._worker: threading.Thread | None = None
        self._closed = False
        self.batch_sizes: list[int] = []  # for tests and the load benchmark

    def submit(self, item: Any) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append((item, fut))
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="cxrscreen-batcher", daemon=True)
                self._worker.start()
            self._cond.notify()
        return fut

    def __call__(self, item: Any) -> Any:
        """Submit and wait for the result (blocking)."""
        return self.submit(item).result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _take(self) -> list[tuple[Any, Future]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            deadline = time.monotonic() + self.wait_s
            while len(self._queue) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            items = [item for item, _ in batch]
            try:
                with self.lock:
                    outputs = list(self.fn(items))
                if len(outputs) != len(items):
                    raise RuntimeError(f"batch function returned {len(outputs)} outputs for {len(items)} items")
            except BaseException as exc:  # every waiting request gets the error, the worker goes on
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            self.batch_sizes.append(len(items))
            for (_, fut), out in zip(batch, outputs, strict=True):
                fut.set_result(out)


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


def decision_rule(run: LoadedRun) -> dict[str, Any]:
    """How the class is chosen from the probabilities, in the form of a result's `decision` field."""
    return run.decision_rule().to_dict()


class _Service:
    """The loaded model with its predictor, batcher and (created on first use) the task's drawer."""

    def __init__(self, run: LoadedRun, gate: Any, *, max_decodes: int = MAX_CONCURRENT_DECODES,
                 max_batch: int = MAX_BATCH, batch_wait_s: float = BATCH_WAIT_S,
                 cam_max_batch: int = CAM_MAX_BATCH) -> None:
        self.run = run
        self.predictor = Predictor(run, gate=gate)
        self.lock = threading.Lock()  # forward passes and Grad-CAM
        self.heatmap_problem = heatmap_problem(run)  # why heatmaps are refused (a bare .onnx file), else None
        # ONNX Runtime: the forward passes are not the PyTorch model's, so its Grad-CAM hooks never see them
        cam_lock = threading.Lock() if getattr(run.model, "takes_numpy", False) else self.lock
        self.decode_slots = threading.BoundedSemaphore(max_decodes)
        self.big_decode_slot = threading.BoundedSemaphore(1)  # see decode()
        self.batcher = MicroBatcher(self.predictor.outputs, max_batch=max_batch, wait_s=batch_wait_s,
                                    lock=self.lock)
        # the model's part of the pictures of the heatmap requests waiting together (Drawer.explain), one pass
        self.explain_batcher = MicroBatcher(self._explain, max_batch=cam_max_batch, wait_s=batch_wait_s,
                                            lock=cam_lock)
        self.draw_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DRAWS)
        self.draw_lock = threading.Lock()  # making the drawer
        self._draw: Drawer | None = None  # the task's drawer (Grad-CAM or boxes), made on the first heatmap
        self._severity: Any = None  # severity.SeverityScorer, created on the first request that asks for it

    def decode(self, data: bytes, label: str) -> Prepared:
        """Decode (at most `max_decodes` at once, reduced to DECODE_MAX_SIDE) and preprocess one upload.

        An upload whose header announces more than BIG_DECODE_BYTES decoded (or says nothing: a deflated
        DICOM) waits for the one slot of big decodes instead, so that a burst of them never holds the slots of
        ordinary X-rays (a normal upload waited 7.5 s behind compressed TIFF bombs)."""
        size = decoded_bytes_estimate(data)
        with self.decode_slots if size is not None and size <= BIG_DECODE_BYTES else self.big_decode_slot:
            try:
                xray = read_xray_bytes(data, name=label, max_pixels=MAX_PIXELS, max_side=DECODE_MAX_SIDE)
                return self.predictor.prepare(xray)
            finally:
                release_freed_memory()

    def _drawer(self) -> Drawer:
        """The task's drawer, made on first use (a classifier's imports pytorch-grad-cam: seconds; with the ONNX
        Runtime engine it also loads the PyTorch model beside the export)."""
        with self.draw_lock:
            if self._draw is None:
                draw_run = drawing_run(self.run)
                self._draw = draw_run.task.drawer(draw_run)
            return self._draw

    def _explain(self, items: Sequence[tuple[Prepared, str]]) -> list[Any]:
        """The model's part of the pictures of waiting heatmap requests (Grad-CAM), in batched passes; runs under
        the model lock (the explain batcher's)."""
        return self._drawer().explain([prep for prep, _ in items], [target for _, target in items])

    def analyse(self, data: bytes, name: str, heatmap: bool, target: str | None,
                severity: bool = False) -> dict[str, Any]:
        """Decode, predict and optionally explain and score severity of one upload (blocking: call it in a
        worker thread)."""
        if heatmap and self.heatmap_problem is not None:
            raise CXRError(self.heatmap_problem, name)
        prep = self.decode(data, name)
        probs, extra = self.batcher(prep)
        result = self.predictor.result(prep, probs, extra).to_dict(identity=False)  # the JSON object (no UIDs)
        if severity:
            with self.lock:
                if self._severity is None:
                    from cxrscreen.severity.scorer import SeverityScorer

                    self._severity = SeverityScorer.for_run(self.run)
                self._severity.annotate(result, prep.xray)
        if not heatmap:
            return result
        if result["probabilities"] is None:  # flagged: no diagnosis, nothing to explain
            result["heatmap_target"] = None
            result["heatmap_png_base64"] = None
            return result
        probs = result["probabilities"]
        target = target or result["class"] or max(probs, key=probs.get)
        explanation = self.explain_batcher((prep, target))  # batched with the other heatmap requests
        with self.draw_slots:
            # the same picture as the CLI's (a classifier's heat map, a detector's boxes; the six zones' scores
            # in a band below with severity) without the caption band: the page shows the class, the
            # probabilities and the caption beside the image
            img = self._drawer()(prep, result, target, caption=False, explanation=explanation)
        result["heatmap_target"] = target if self.run.task.drawing == "heatmap" else None
        result["heatmap_png_base64"] = png_base64(img, prep.path)
        return result


def create_app(run: LoadedRun, *, gate: Any = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_decodes: int = MAX_CONCURRENT_DECODES, max_batch: int = MAX_BATCH,
               batch_wait_s: float = BATCH_WAIT_S, cam_max_batch: int = CAM_MAX_BATCH,
               allowed_hosts: Sequence[str] | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S, api_docs: bool = False) -> FastAPI:
    """The web app for one loaded model; `gate` (optional) has `flags(xray, image) -> list[str]` and
    withholds the class and probabilities of an input it flags. Uploads over `max_upload_bytes` are refused
    with 413; at most `max_decodes` uploads are decoded at once; forward passes are batched (`max_batch`
    images collected for `batch_wait_s`), and so are the Grad-CAM passes of heatmap requests (`cam_max_batch`).
    `allowed_hosts`: Host header values accepted (400 for others;
    None: any); a request body chunk slower than `body_timeout_s` gets 408; `api_docs`: serve
    /openapi.json (never the CDN-loaded /docs and /redoc pages). Every response carries the security
    headers (`cxrscreen.serving.security`)."""
    service = _Service(run, gate, max_decodes=max_decodes, max_batch=max_batch, batch_wait_s=batch_wait_s,
                       cam_max_batch=cam_max_batch)
    model_card = _read_model_card(run.run_dir)
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.batcher.close()
        service.explain_batcher.close()

    app = FastAPI(title="cxrscreen", version="0.1.0", lifespan=lifespan,
                  description="Chest X-ray screening (covid / normal / pneumonia). "
                              "Research use only: not a medical device.",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json" if api_docs else None)
    app.add_middleware(_BodyLimit, max_upload_bytes=max_upload_bytes)
    _harden(app, allowed_hosts=allowed_hosts, body_timeout_s=body_timeout_s, page_html=INDEX_HTML)
    app.state.service = service

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
            "kind": run.kind,
            "classes": run.classes,
            "preprocess": run.preprocess.to_dict(),
            "weights_sha256": run.config.get("weights_sha256"),
            "temperature": run.temperature,
            "operating_point": run.config.get("operating_point"),
            "covid_threshold": run.decision_rule().threshold,
            "decision": decision_rule(run),
            "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": MAX_PIXELS,
                       "decode_max_side": DECODE_MAX_SIDE, "max_concurrent_decodes": max_decodes},
            "model_card": model_card,
            "severity": severity_info(run.run_dir),
        }

    @app.post("/api/predict", response_model=None)
    async def predict(
        request: Request,
        file: Annotated[UploadFile, File(description="a chest X-ray: PNG, JPEG, TIFF, BMP or DICOM")],
        heatmap: Annotated[bool, Query(description="add a PNG (base64) of the model's picture: a "
                                                     "classifier's Grad-CAM overlay, a detector's boxes")] = False,
        target: Annotated[str | None, Query(description="class the heatmap explains (default: the "
                                                        "predicted class, else the most probable)")] = None,
        severity: Annotated[bool, Query(description="add COVID-19 severity (geographic extent, opacity, per "
                                                    "lung, zones; null for a normal call or a flagged image)")
                            ] = False,
    ) -> dict[str, Any] | JSONResponse:
        """Class, probability of each class, and flags for one uploaded image (flagged: class and
        probabilities null)."""
        name = upload_label(file.filename)
        if len((await request.form()).getlist("file")) != 1:
            return _error(422, "send exactly one 'file' part (this request has several)", name)
        if severity and severity_info(run.run_dir) is None:
            return _error(422, "this model ships no severity regressor", name)
        if target is not None and target not in run.classes:
            return _error(422, f"unknown target class {target!r}; classes: {', '.join(run.classes)}", name)
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return _error(413, f"{name}: file is over the upload limit of {max_upload_bytes:,} bytes", name)
        try:
            result = await run_in_threadpool(service.analyse, data, name, heatmap, target, severity)
        except CXRError as exc:
            return _error(422, str(exc), name)
        return PredictionResult.from_dict(result).to_dict()  # the JSON shape every writer uses

    return app


def load_for_serving(model: str | Path | None = None, engine: str = "torch", *, threads: int | None = None
                     ) -> LoadedRun:
    """The run `serve` serves (`predict.onnx_engine.load_for_engine`). With the torch engine its classifier
    logits come from a frozen TorchScript graph (`LoadedRun.with_frozen_graph`; Grad-CAM keeps the eager model),
    profiled for every forward-pass size the server makes (1 to `CPU_FORWARD_CHUNK`) before the first request."""
    from cxrscreen.predict.onnx_engine import load_for_engine
    from cxrscreen.tasks.classification import CPU_FORWARD_CHUNK

    run = load_for_engine(model, engine, threads=threads)
    frozen = run.with_frozen_graph() if engine == "torch" else run
    if frozen.frozen is not None:
        from cxrscreen.models.frozen import warm_up

        warm_up(frozen.frozen, frozen.preprocess.image_size, range(1, CPU_FORWARD_CHUNK + 1))
    return frozen


def serve(model: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          torch_threads: int | None = None, engine: str = "torch", allowed_hosts: Sequence[str] = ()) -> None:
    """Load a run directory (or the bundled model when None) and serve the app with uvicorn (timeouts and
    limits of `cxrscreen.serving.security.uvicorn_config`; Host checked against the bound address plus
    `allowed_hosts`, none for a wildcard bind without `allowed_hosts`).
    `torch_threads`: intra-op threads of the forward passes (None: torch's default, one per core).
    `engine`: "torch", or "onnxruntime" with `model` an .onnx export or a folder holding model.onnx (the bundled
    export when None; `cxrscreen.predict.onnx_engine`): heatmaps then need the PyTorch weights beside it."""
    import uvicorn


    if torch_threads is not None and engine == "torch":  # ONNX Runtime takes them in load_for_engine (and gives
        import torch  # them to PyTorch when a heatmap loads it): classification imports no torch

        torch.set_num_threads(max(1, torch_threads))
    run = load_for_serving(model, engine, threads=torch_threads)
    app = create_app(run, gate=gate_for_run(run), allowed_hosts=allowed_hosts_for(host, allowed_hosts))
    uvicorn.Server(uvicorn_config(app, host, port)).run()
