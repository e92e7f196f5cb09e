"""The ASGI app the UI server process runs: the Reflex app, with nothing in front of the guard.

Reflex puts a CORS middleware on its top-level app, outside ``api_transformer`` and so outside
our guard: it answered preflight (OPTIONS) requests itself, unchecked. The page and its backend
share one origin and ``cors_allowed_origins`` is empty, so that layer grants nothing; without it
every request, OPTIONS included, reaches the guard (Host allowlist, Origin check, login).
"""

from __future__ import annotations

import importlib
from typing import Any

TARGET = "backpropagate.launcher.asgi:app"


def _no_cors(api: Any) -> None:
    """Stands in for ``reflex.app.App._add_cors``: add no CORS middleware."""


def app() -> Any:
    """Factory for the server (granian or gunicorn call it in each worker)."""
    from reflex.app import App
    from reflex.utils.exec import get_app_module

    App._add_cors = staticmethod(_no_cors)  # type: ignore[method-assign]
    rx_app = importlib.import_module(get_app_module()).app
    return rx_app()
