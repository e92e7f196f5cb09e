"""Reflex configuration of the web app; ``backprop ui`` sets the environment it reads.

Lives inside the package so that an installed wheel carries it; the checkout's root
``rxconfig.py`` only re-exports it.
"""

from __future__ import annotations

import os

# Before importing reflex: use the venv's node/npm (no bun download) and never phone home.
os.environ.setdefault("REFLEX_USE_NPM", "1")
os.environ.setdefault("REFLEX_CHECK_LATEST_VERSION", "0")
os.environ.setdefault("REFLEX_TELEMETRY_ENABLED", "0")

import reflex as rx  # noqa: E402
from reflex import constants  # noqa: E402
from reflex.plugins import RadixThemesPlugin, SitemapPlugin  # noqa: E402

from ui_app.same_origin import SameOriginBackendPlugin  # noqa: E402

_port = int(os.environ.get("BACKPROPAGATE_UI_PORT", "7860"))

config = rx.Config(
    app_name="ui_app",
    app_module_import="ui_app.ui_app",
    telemetry_enabled=False,
    frontend_port=_port,
    backend_port=_port,
    backend_host=os.environ.get("BACKPROPAGATE_UI_HOST", "127.0.0.1"),
    # `localhost` (not 127.0.0.1) so the browser side rewrites it to the page's origin.
    api_url=f"http://localhost:{_port}",
    deploy_url=None,
    # CORS off: the page and its backend share one origin; the guard checks Origin itself
    # (socket.io treats [] as "no CORS handling" rather than "refuse everything").
    cors_allowed_origins=[],
    show_built_with_reflex=False,
    plugins=[RadixThemesPlugin(), SameOriginBackendPlugin()],
    disable_plugins=[SitemapPlugin],
    # Page state stays in this process's memory: the disk mode pickles it (previews included)
    # into .states/ in the build folder.
    state_manager_mode=constants.StateManagerMode.MEMORY,
)
