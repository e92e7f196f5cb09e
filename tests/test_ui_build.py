"""Every page builds into a component tree, routes are unique, and the UI imports no torch."""

from __future__ import annotations

import subprocess
import sys

from ui_app.pages import PAGES


def test_every_page_builds_and_routes_are_unique() -> None:
    routes = [route for route, _, _ in PAGES]
    assert len(routes) == len(set(routes))
    assert {"/", "/new", "/runs/[run_id]", "/compare", "/export", "/chat"} <= set(routes)
    for route, component, title in PAGES:
        tree = component()
        assert tree.render(), route
        assert title.endswith("Backpropagate")


def test_pages_do_not_import_torch() -> None:
    code = "import sys; import ui_app.pages; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
