"""The login page and the guard in a real browser (Chromium): sign in, same-origin calls, CSWSH refused."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_security_guard import PASSWORD, Server, free_port, make_policy, start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or not shutil.which(CHROMIUM),
    reason="needs playwright and Chromium",
)


@pytest.fixture(scope="module")
def basic_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    policy, token = make_policy("basic", free_port())
    srv = start_server(tmp_path_factory.mktemp("guard-browser"), policy, token, relaxed=False)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, args=["--headless=new", "--no-sandbox", "--disable-gpu"]
        )
        yield b
        b.close()


WS_OPENS = """url => new Promise(resolve => {
  const ws = new WebSocket(url);
  ws.onmessage = e => { resolve('message:' + e.data); ws.close(); };
  ws.onerror = () => resolve('refused');
  setTimeout(() => resolve('timeout'), 5000);
})"""


def test_security_browser_login_and_same_origin_calls(basic_server: Server, browser, tmp_path: Path) -> None:
    base = basic_server.origin  # http://localhost:PORT
    page = browser.new_page()
    page.goto(base + "/")
    assert page.url == base + "/login?next=%2F"

    page.fill("#username", "alice")
    page.fill("#password", "wrong password")
    page.click("button[type=submit]")
    assert page.get_by_role("alert").inner_text() == "Wrong credentials. Try again."

    page.fill("#username", "alice")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    assert "the app page" in page.inner_text("body")
    cookie = next(c for c in page.context.cookies() if c["name"].startswith("backprop_session_"))
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    # The page's own script may call the API and open sockets: the browser adds a matching Origin.
    status = page.evaluate("fetch('/api/test/echo', {method: 'POST', body: '{}'}).then(r => r.status)")
    assert status == 200
    assert page.evaluate(WS_OPENS, f"ws://localhost:{basic_server.port}/_event") == "message:hello"

    # A page from another origin (127.0.0.1 is another site than localhost) cannot hijack the socket.
    other = browser.new_page()
    other.goto(f"http://127.0.0.1:{basic_server.port}/login")
    assert other.evaluate(WS_OPENS, f"ws://localhost:{basic_server.port}/_event") == "refused"

    page.evaluate("fetch('/api/auth/logout', {method: 'POST'})")
    page.goto(base + "/")
    assert page.url.startswith(base + "/login")
    page.close()
    other.close()
