"""The Reflex app module: wires the pages, the API and the security guard together.

Importing it outside `backprop ui` refuses to start: without the launcher's marker there is no
auth policy, and the app must never serve without one.
"""

from __future__ import annotations

import reflex as rx

from backpropagate.server.app import create_app
from backpropagate.server.security import build_guard, load_launch_policy
from ui_app.pages import PAGES

# First, before any route exists: raises RUNTIME_UI_AUTH_NOT_ENFORCED without the marker.
policy = load_launch_policy()

# api_transformer applies in order: the FastAPI app gets the Reflex app mounted under it (its own
# /api routes win), then the guard wraps that whole stack, so the static front end, the /_event
# socket and /api all pass through it.
app = rx.App(api_transformer=[create_app(), lambda asgi: build_guard(asgi, policy)])

for route, component, title in PAGES:
    app.add_page(component, route=route, title=title)
