"""The Reflex app module: wires the pages, the API and the security guard together.

Importing it outside `backprop ui` refuses to start: without the launcher's marker there is no
auth policy, and the app must never serve without one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import reflex as rx

from backpropagate.server.app import create_app
from backpropagate.server.security import build_guard, load_launch_policy
from ui_app.pages import PAGES

# First, before any route exists: raises RUNTIME_UI_AUTH_NOT_ENFORCED without the marker.
policy = load_launch_policy()
api = create_app()

# api_transformer applies in order: the FastAPI app gets the Reflex app mounted under it (its own
# /api routes win), then the guard wraps that whole stack, so the static front end, the /_event
# socket and /api all pass through it.
app = rx.App(api_transformer=[api, lambda asgi: build_guard(asgi, policy)])


@contextlib.asynccontextmanager
async def api_lifespan() -> AsyncIterator[None]:
    """Start and stop the API's RunService with the server.

    Reflex serves through its own top-level Starlette app, which does not run the lifespan of an
    app mounted inside it, so the API's lifespan runs as a Reflex lifespan task instead.
    """
    async with api.router.lifespan_context(api):
        yield


app.register_lifespan_task(api_lifespan)

for route, component, title in PAGES:
    app.add_page(component, route=route, title=title)
