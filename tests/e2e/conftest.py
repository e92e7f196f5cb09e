"""Browser tests: the real `backprop ui` server (subprocess, isolated home, free port) and Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ui_server import CHROMIUM, CHROMIUM_ARGS, UiServer, prepared_home, refresh_ui_cache, running_ui


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict:
    """Debian's Chromium instead of a downloaded browser."""
    return {"executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def ui_server() -> Iterator[UiServer]:
    """`backprop ui` in local mode on a free port with its own BACKPROPAGATE_HOME."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium")
    with prepared_home("backprop-e2e-home-") as home, running_ui(home) as server:
        refresh_ui_cache(home)
        yield server


@pytest.fixture(scope="module")
def ui(browser, ui_server):  # noqa: ANN001 - pytest-playwright's Browser
    """One signed-in page shared by a module's tests (the steps build on each other)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(ui_server.login_url)
    page.wait_for_url(f"{ui_server.base}/**")
    yield page
    context.close()
