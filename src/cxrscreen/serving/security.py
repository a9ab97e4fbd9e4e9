"""What bounds the server against hostile clients: connection timeouts and limits, request-body timeout,
security headers and the Host check.

- :class:`GuardedH11Protocol`: uvicorn's HTTP/1.1 protocol with a deadline for the request head (a
  connection that has sent no complete request line and headers after `HEAD_TIMEOUT_S` is closed: slow
  headers, idle or half-open sockets).
- :func:`uvicorn_config`: keep-alive timeout, the head size limit, a connection limit (503 above it) and the
  protocol above.
- :class:`BodyTimeout`: each read of the request body must arrive within `BODY_TIMEOUT_S` (a slow body, or
  a Content-Length larger than the body sent, gets 408 instead of holding the connection forever).
- :class:`SecurityHeaders`: Content-Security-Policy (the page's own inline script and style only, by hash;
  no framing), X-Content-Type-Options, Referrer-Policy, X-Frame-Options on every response.
- :func:`allowed_hosts_for`: the Host names a server bound to an address accepts (DNS rebinding against a
  server on 127.0.0.1 sends a foreign Host).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEAD_TIMEOUT_S = 10.0
"""Seconds a new connection has to send a complete request head (request line and headers)."""
KEEP_ALIVE_TIMEOUT_S = 5.0
"""Seconds an idle keep-alive connection stays open after a response."""
BODY_TIMEOUT_S = 15.0
"""Seconds the server waits for each next chunk of a request body (408 after that)."""
BODY_TOTAL_TIMEOUT_S = 60.0
"""Seconds a whole request body may take (a client trickling one byte a second gets 408): 30 MB, the
upload limit, at 4 Mbit/s."""
MAX_CONNECTIONS = 200
"""Connections and requests in progress at once; above it new requests get 503."""
MAX_HEAD_BYTES = 16 * 1024
"""Largest request head (request line and headers) accepted; larger gets 400."""


def allowed_hosts_for(host: str, extra: Sequence[str] = ()) -> list[str] | None:
    """The Host header values (port ignored) a server bound to `host` accepts, plus `extra`; None (no check)
    for a wildcard bind (0.0.0.0, ::) without `extra`: its public names are unknown."""
    names = list(extra)
    if host in ("0.0.0.0", "::", ""):
        return names or None
    names.append(host if ":" not in host else f"[{host}]")
    if host in ("127.0.0.1", "localhost", "::1"):
        names += ["127.0.0.1", "localhost", "[::1]"]
    return sorted(set(names))


def _csp_hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode("ascii")
                    + "'" for b in blocks)


def content_security_policy(page_html: str) -> str:
    """A policy that lets the page run its own inline script and style (by sha256) and nothing else: no
    third-party asset, no framing (frame-ancestors 'none'), forms and fetches to this origin only."""
    return ("default-src 'none'; "
            f"script-src {_csp_hashes(page_html, 'script')}; "
            f"style-src {_csp_hashes(page_html, 'style')}; "
            "img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'")


class SecurityHeaders:
    """ASGI middleware adding the security headers to every HTTP response."""

    def __init__(self, app: ASGIApp, csp: str) -> None:
        self.app = app
        self.headers = [(b"content-security-policy", csp.encode("ascii")),
                        (b"x-content-type-options", b"nosniff"),
                        (b"referrer-policy", b"no-referrer"),
                        (b"x-frame-options", b"DENY")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *[(k, v) for k, v in self.headers if k not in present]]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyReadTimeout(HTTPException):
    """Raised when the next chunk of a request body does not arrive in time."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s (a slow client, or a "
                              "Content-Length larger than the body sent)")


class BodyTimeout:
    """ASGI middleware: every `receive()` of a request body must complete within `seconds`, and the whole
    body within `total_seconds` of the request's start.

    The error is raised inside the app's body read (an HTTPException, so FastAPI lets it through to the
    app's handler); if it escapes before a response started, this middleware answers 408 itself."""

    def __init__(self, app: ASGIApp, seconds: float = BODY_TIMEOUT_S,
                 total_seconds: float = BODY_TOTAL_TIMEOUT_S) -> None:
        self.app = app
        self.seconds = seconds
        self.total_seconds = total_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        deadline = asyncio.get_running_loop().time() + self.total_seconds

        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            left = deadline - asyncio.get_running_loop().time()
            wait = min(self.seconds, left)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, wait))
            except TimeoutError:
                raise BodyReadTimeout(self.seconds if wait == self.seconds else self.total_seconds) from None
            body_done = body_done or message["type"] == "http.disconnect" or not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if not body_done and not _has_body_done(scope):
                    # answered before the body was read (an error): close the connection after the response,
                    # or the server would go on reading a trickled body for as long as the client sends it
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except BodyReadTimeout as exc:
            if started:
                raise
            from fastapi.responses import JSONResponse

            await JSONResponse({"error": exc.detail, "path": None}, status_code=408,
                               headers={"connection": "close"})(scope, receive, send)


def _has_body_done(scope: Scope) -> bool:
    """True for a request without a body (no Content-Length or 0, no chunked transfer)."""
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length", b"0").strip()
    return (length in (b"", b"0") and b"chunked" not in headers.get(b"transfer-encoding", b"").lower())


def guarded_h11_protocol(head_timeout_s: float = HEAD_TIMEOUT_S) -> type:
    """uvicorn's H11Protocol closing a connection that sends no complete request head within
    `head_timeout_s` of being opened (uvicorn itself waits for it forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(head_timeout_s, self._head_too_slow)

        def _head_too_slow(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no request head yet
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def uvicorn_config(app: Any, host: str, port: int, *, head_timeout_s: float = HEAD_TIMEOUT_S,
                   keep_alive_s: float = KEEP_ALIVE_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS,
                   log_level: str = "info") -> Any:
    """The uvicorn.Config cxrscreen serves with: the guarded HTTP/1.1 protocol, keep-alive timeout,
    head size limit and connection limit."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=guarded_h11_protocol(head_timeout_s),
                          timeout_keep_alive=int(max(1, keep_alive_s)), limit_concurrency=max_connections,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, log_level=log_level)


def harden(app: Any, *, allowed_hosts: Sequence[str] | None, body_timeout_s: float, page_html: str,
           body_total_timeout_s: float = BODY_TOTAL_TIMEOUT_S) -> None:
    """Add the body timeout, the Host check (when `allowed_hosts` is given) and the security headers to a
    FastAPI app (outermost last: the headers are on every response, a refused Host's included)."""
    from fastapi.responses import JSONResponse
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    @app.exception_handler(BodyReadTimeout)
    async def body_timeout(_: Any, exc: BodyReadTimeout) -> JSONResponse:
        return JSONResponse({"error": exc.detail, "path": None}, status_code=408, headers={"connection": "close"})

    app.add_middleware(BodyTimeout, seconds=body_timeout_s, total_seconds=body_total_timeout_s)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    app.add_middleware(SecurityHeaders, csp=content_security_policy(page_html))


def release_freed_memory() -> None:
    """Hand memory freed by a large decode back to the system (glibc's malloc_trim; elsewhere nothing).

    Worker threads each keep a malloc arena; without this, a burst of big decodes left gigabytes held by a
    server that no longer used them."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _TRIM = libc.malloc_trim if hasattr(libc, "malloc_trim") else False
        except OSError:
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None
