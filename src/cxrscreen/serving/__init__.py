"""The web page and HTTP API: `create_app(run)` builds the FastAPI app, `serve(model)` runs it."""

from __future__ import annotations

from cxrscreen.serving.app import create_app, serve

__all__ = ["create_app", "serve"]
