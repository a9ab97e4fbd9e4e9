"""The server against a hostile client (issue 21): no API docs from a CDN, security headers, the Host check,
two file parts, decompression-bomb TIFFs, slow headers, slow bodies and short bodies."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cxrscreen.runs.run_dir import LoadedRun
from cxrscreen.serving import create_app
from cxrscreen.serving.page import INDEX_HTML
from cxrscreen.serving.security import BodyTimeout, allowed_hosts_for, uvicorn_config
from tests.serving.test_app import png_bytes, run  # noqa: F401 (the tiny model fixture)


@pytest.fixture(scope="module")
def app(run: LoadedRun) -> Any:  # noqa: F811
    return create_app(run, allowed_hosts=allowed_hosts_for("127.0.0.1"), body_timeout_s=1.0)


@pytest.fixture(scope="module")
def client(app: Any) -> TestClient:
    return TestClient(app, base_url="http://127.0.0.1:8000")


def test_no_api_docs_by_default(client: TestClient, run: LoadedRun) -> None:  # noqa: F811
    """/docs loaded Swagger UI from a CDN; /redoc and /openapi.json were open."""
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path
    with_schema = TestClient(create_app(run, api_docs=True))
    assert with_schema.get("/openapi.json").status_code == 200
    assert with_schema.get("/docs").status_code == 404  # the schema, never the CDN-loaded page


def test_security_headers_on_every_response(client: TestClient) -> None:
    for r in (client.get("/"), client.get("/healthz"), client.get("/nowhere"),
              client.post("/api/predict", files={"file": ("x.png", b"not an image", "image/png")})):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert "https:" not in csp and "unsafe-inline" not in csp


def test_csp_allows_exactly_the_pages_own_script_and_style(client: TestClient) -> None:
    csp = client.get("/").headers["content-security-policy"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", INDEX_HTML, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp, csp


def test_foreign_host_header_is_refused(client: TestClient) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/healthz", headers={"host": "localhost:8000"}).status_code == 200
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("0.0.0.0", ["x.org"]) == ["x.org"]


def test_two_file_parts_are_refused(client: TestClient) -> None:
    """The last part won silently before."""
    files = [("file", ("a.png", png_bytes(seed=1), "image/png")), ("file", ("b.png", png_bytes(seed=2), "image/png"))]
    r = client.post("/api/predict", files=files)
    assert r.status_code == 422 and "exactly one" in r.json()["error"]


def test_compressed_tiff_bomb_is_refused_before_decoding(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.new("I", (7071, 7071)).save(buf, format="TIFF", compression="tiff_adobe_deflate")
    assert len(buf.getvalue()) < 2_000_000
    r = client.post("/api/predict", files={"file": ("bomb.tif", buf.getvalue(), "image/tiff")})
    assert r.status_code == 422 and "once decoded, over the limit" in r.json()["error"]


def test_stalled_body_gets_408(app: Any) -> None:
    """A client that stops sending its body (or announces more than it sends) held the request forever."""
    sent: list[dict[str, Any]] = []
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b"--x\r\nContent-Disposition: form-data; name=\"file\"",
                    "more_body": True}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/predict", "raw_path": b"/api/predict", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"multipart/form-data; boundary=x"),
                         (b"content-length", b"100000")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 20))
    assert time.monotonic() - t0 < 10
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 408


def test_trickled_body_gets_408_at_the_total_deadline() -> None:
    """One byte a second never trips a per-chunk timeout: the whole body has a deadline too."""
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(BodyTimeout(app, seconds=1.0, total_seconds=1.5)({"type": "http"}, receive, send),
                                 20))
    assert 1.4 < time.monotonic() - t0 < 5
    assert sent[0]["status"] == 408


# ------------------------------------------------------------------------------------ uvicorn's own limits


@pytest.fixture(scope="module")
def server(app: Any) -> Iterator[int]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, head_timeout_s=1.0, keep_alive_s=1.0,
                                        log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield port
    srv.should_exit = True
    t.join(10)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(the server closed the socket within `seconds`, what it sent before closing)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
        return True, got
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def test_slow_header_and_idle_connections_are_closed(server: int) -> None:
    """50 slow-header sockets were still open after 60 s; half-open connections were never closed."""
    with socket.create_connection(("127.0.0.1", server)) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        closed, _ = _closed_within(slow, 6)
        assert closed, "a connection sending its headers slowly stayed open"
    with socket.create_connection(("127.0.0.1", server)) as idle:
        closed, _ = _closed_within(idle, 6)
        assert closed, "a connection that sent nothing stayed open"


def test_early_error_closes_a_connection_still_sending_its_body(server: int) -> None:
    """A 400 sent before the body was read left the server reading a trickled body for as long as it came."""
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                  b"boundary=x\r\nContent-Length: 100000\r\n\r\nnot multipart")
        s.settimeout(1.0)
        got, t0 = b"", time.monotonic()
        closed = False
        while time.monotonic() - t0 < 8:
            try:
                s.sendall(b"x")
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            got += chunk
        assert got.startswith(b"HTTP/1.1 400") and closed, got[:200]


def test_short_body_gets_408_and_keep_alive_ends(server: int) -> None:
    """A Content-Length larger than the body hung until the client left."""
    with socket.create_connection(("127.0.0.1", server)) as short:
        short.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                      b"boundary=x\r\nContent-Length: 5000\r\n\r\n--x\r\n")
        closed, got = _closed_within(short, 8)
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
    with socket.create_connection(("127.0.0.1", server)) as kept:
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        closed, got = _closed_within(kept, 6)
        assert got.startswith(b"HTTP/1.1 200") and closed, got[:200]


def test_big_decodes_never_hold_the_slots_of_ordinary_uploads(run: LoadedRun) -> None:  # noqa: F811
    """While eight clients sent compressed TIFF bombs, a 36 KB X-ray waited 7.5 s for a decode slot."""
    from concurrent.futures import ThreadPoolExecutor

    client = TestClient(create_app(run, max_decodes=2))
    service = client.app.state.service
    buf = io.BytesIO()
    Image.new("I", (3000, 3000)).save(buf, format="TIFF", compression="tiff_adobe_deflate")  # 36 MB decoded
    assert service.big_decode_slot.acquire(timeout=5)  # a big decode in progress
    held = True
    try:
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(client.post, "/api/predict", files={"file": ("big.tif", buf.getvalue(), "image/tiff")})
            t0 = time.monotonic()
            r = client.post("/api/predict", files={"file": ("x.png", png_bytes(), "image/png")})
            assert r.status_code == 200 and time.monotonic() - t0 < 10
            time.sleep(0.5)
            assert not big.done()  # waits for the big slot, not for the ordinary ones
            service.big_decode_slot.release()
            held = False
            assert big.result(60).status_code == 200
    finally:
        if held:
            service.big_decode_slot.release()
