"""The Reflex app module: wires the pages, the API and the security guard together.

Importing it outside `backprop ui` refuses to start: without the launcher's marker there is no
auth policy, and the app must never serve without one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import reflex as rx

from backpropagate.server.security import build_guard, load_launch_policy

# First, before any route exists: raises RUNTIME_UI_AUTH_NOT_ENFORCED without the marker.
policy = load_launch_policy()


def _api():
    """The FastAPI app (routes under /api); Reflex mounts itself under it."""
    try:
        from backpropagate.server.app import create_app
    except ImportError:  # the API is not part of this build yet
        from fastapi import FastAPI

        return FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    return create_app()


def _pages() -> list:
    try:
        from ui_app.pages import PAGES
    except ImportError:
        PAGES = [("/", lambda: rx.container(rx.heading("Backpropagate", size="6")), "Backpropagate")]
    return PAGES


# api_transformer runs in order: the FastAPI instance gets the Reflex app mounted under it (its
# own /api routes win), then the guard wraps that whole stack, so static files, /_event and /api
# all pass through it.
api = _api()
app = rx.App(api_transformer=[api, lambda asgi: build_guard(asgi, policy)])


@contextlib.asynccontextmanager
async def _api_lifespan() -> AsyncIterator[None]:
    # Starlette does not run a mounted app's lifespan: run the API's (its RunService) with Reflex's.
    async with api.router.lifespan_context(api):
        yield


app.register_lifespan_task(_api_lifespan)

for route, component, title in _pages():
    app.add_page(component, route=route, title=title)
