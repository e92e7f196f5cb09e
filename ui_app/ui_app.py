"""The Reflex app module: wires the pages, the API and the security guard together.

Importing it outside `backprop ui` refuses to start: without the launcher's marker there is no
auth policy, and the app must never serve without one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from urllib.parse import quote

import reflex as rx

from backpropagate.server.app import create_app
from backpropagate.server.security import build_guard, load_launch_policy
from ui_app.pages import PAGES
from ui_app.state import service

# The logo of assets/favicon.svg, inlined: `backprop ui` builds in its own folder, without assets/.
FAVICON = "data:image/svg+xml," + quote(
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
    'fill="#3e63dd"/><path d="M7 23 L13 15 L18 19 L25 9" fill="none" stroke="#fff" stroke-width="3" '
    'stroke-linecap="round" stroke-linejoin="round"/><circle cx="25" cy="9" r="2.5" fill="#fff"/></svg>'
)

# First, before any route exists: raises RUNTIME_UI_AUTH_NOT_ENFORCED without the marker.
policy = load_launch_policy()
api = create_app()

# api_transformer applies in order: the FastAPI app gets the Reflex app mounted under it (its own
# /api routes win), then the guard wraps that whole stack, so the static front end, the /_event
# socket and /api all pass through it.
app = rx.App(
    api_transformer=[api, lambda asgi: build_guard(asgi, policy)],
    head_components=[rx.el.link(rel="icon", href=FAVICON, type="image/svg+xml")],
)


@contextlib.asynccontextmanager
async def api_lifespan() -> AsyncIterator[None]:
    """Start and stop the API's RunService with the server.

    Reflex serves through its own top-level Starlette app, which does not run the lifespan of an
    app mounted inside it, so the API's lifespan runs as a Reflex lifespan task instead.
    """
    async with api.router.lifespan_context(api):
        service.use_service(api.state.service, api.state)  # the pages' explicit handle
        try:
            yield
        finally:
            service.use_service(None)


app.register_lifespan_task(api_lifespan)

for route, component, title in PAGES:
    app.add_page(component, route=route, title=title)
