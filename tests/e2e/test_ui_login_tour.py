"""Basic mode in a real browser against the real `backprop ui` server: the /login form, the header's
mode badge and user, a tour of every page with no console errors, and a logout that ends the session.

The account is made with `backprop users add`, as a user would. The tests run in order on one page:
sign in → header → pages tour → log out.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, expect
from ui_server import ARTIFACTS, CHROMIUM, REPO, UiServer, prepared_home, refresh_ui_cache, running_ui

pytestmark = [pytest.mark.browser, pytest.mark.slow]

USER = "alice"
PASSWORD = secrets.token_urlsafe(12)  # per session: nothing guessable ever protects a server
TOUR = [("New run", "/new"), ("Compare", "/compare"), ("Export", "/export"), ("Chat", "/chat"), ("Runs", "/")]


@dataclass
class Problems:
    """What the browser reports going wrong: console errors and failed same-origin requests."""

    base: str
    seen: list[str] = field(default_factory=list)

    def console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            self.seen.append(f"console: {msg.text}")

    def failed(self, request: Request) -> None:
        if request.url.startswith(self.base):
            self.seen.append(f"failed: {request.method} {request.url} ({request.failure})")

    def response(self, response: Response) -> None:
        if response.url.startswith(self.base) and response.status >= 400:
            self.seen.append(f"HTTP {response.status}: {response.request.method} {response.url}")


STATE: dict[str, object] = {}


def _backprop(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )


@pytest.fixture(scope="module")
def basic_server() -> Iterator[UiServer]:
    """`backprop ui --users FILE` (basic mode) on a free port with its own BACKPROPAGATE_HOME."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium")
    with prepared_home("backprop-e2e-login-") as home:
        users = home / "users.json"
        _backprop(home, "users", "add", USER, "--password-stdin", "--file", str(users), stdin=PASSWORD + "\n")
        assert USER in _backprop(home, "users", "list", "--json", "--file", str(users)).stdout
        assert PASSWORD not in users.read_text()  # hashed, never stored in clear
        with running_ui(home, "--users", str(users), log_name="e2e-login-server.log") as server:
            assert "token=" not in server.login_url  # basic mode: accounts, no launch token
            refresh_ui_cache(home)
            yield server


@pytest.fixture(scope="module")
def page(browser: Browser, basic_server: UiServer) -> Iterator[Page]:
    """One page for the module, signed out at first (the steps build on each other)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def shot(target: Page, name: str, selector: str | None = None) -> None:
    path = ARTIFACTS / f"ui-login-{name}.png"
    if selector:
        target.locator(selector).first.screenshot(path=str(path))
    else:
        target.screenshot(path=str(path), full_page=True)


def test_login_page_refuses_a_wrong_password_and_signs_in_by_keyboard(
    page: Page, basic_server: UiServer
) -> None:
    base = basic_server.base
    page.goto(base + "/")
    assert page.url == base + "/login?next=%2F"
    # every field is labelled
    expect(page.get_by_label("User name")).to_be_visible()
    expect(page.get_by_label("Password")).to_have_attribute("type", "password")
    shot(page, "page")

    page.get_by_label("User name").fill(USER)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("Wrong credentials. Try again.")
    assert page.url.startswith(base + "/login")
    assert not [c for c in page.context.cookies() if c["name"].startswith("backprop_session_")]
    shot(page, "wrong-password")

    # Keyboard only: the user name has focus on load, Tab reaches the password, Enter submits.
    assert page.evaluate("document.activeElement.id") == "username"
    page.keyboard.type(USER)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "password"
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(base + "/")
    expect(page.get_by_role("heading", name="Runs", level=1)).to_be_visible(timeout=30000)
    cookie = next(c for c in page.context.cookies() if c["name"].startswith("backprop_session_"))
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    STATE["cookie"] = f"{cookie['name']}={cookie['value']}"


def test_header_shows_the_mode_and_the_user_as_text(page: Page) -> None:
    # Both arrive through the app's socket (an event, a script, a state update): seeing them
    # means the live connection works behind the guard.
    header = page.get_by_role("banner")
    expect(header.locator("#mode-badge")).to_have_text("Basic", timeout=30000)
    expect(header.locator("#user-name")).to_have_text(USER)
    # text in the accessibility tree, not a colour: assistive technology reads both, and what they are
    expect(header).to_match_aria_snapshot(f'- text: "Sign-in mode: Basic Signed in as {USER}"')
    expect(page.get_by_role("main").get_by_role("heading", level=1)).to_have_count(1)
    expect(header.get_by_role("button", name="Log out")).to_be_visible()
    shot(page, "header", "header")
    # on a phone the header wraps instead of pushing the page sideways
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.locator("#user-name")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390 + 1
    shot(page, "header-phone", "header")
    page.set_viewport_size({"width": 1280, "height": 900})


def test_pages_tour_without_console_errors_and_a_live_runs_list(page: Page, basic_server: UiServer) -> None:
    base = basic_server.base
    problems = Problems(base)
    page.on("console", problems.console)
    page.on("requestfailed", problems.failed)
    page.on("response", problems.response)
    try:
        # A run queued through the API with the browser's cookie shows up on the open Runs page.
        origin = {"Origin": base}  # what the app's own pages send with a state-changing request
        data = (REPO / "examples" / "quickstart.jsonl").read_bytes()
        upload = page.request.post(
            f"{base}/api/datasets",
            multipart={"file": {"name": "tour.jsonl", "mimeType": "application/json", "buffer": data}},
            headers=origin,
        )
        assert upload.status == 201, upload.text()
        config = {"name": "login tour", "model": "demo-qwen2", "data": upload.json()["id"], "steps": 50}
        created = page.request.post(f"{base}/api/runs", data=config, headers=origin)
        assert created.status == 201, created.text()
        run_id = created.json()["id"]
        row = page.locator(f"[data-run-id='{run_id}']")
        expect(row).to_contain_text("login tour", timeout=20000)
        stopped = page.request.post(f"{base}/api/runs/{run_id}/stop", headers=origin)
        assert stopped.status == 200, stopped.text()
        expect(row).to_contain_text("Cancelled", timeout=90000)  # the list keeps up without a reload

        nav = page.get_by_role("navigation", name="Pages")
        for label, path in TOUR:
            nav.get_by_role("link", name=label, exact=True).click()
            page.wait_for_url(base + path)
            expect(page.get_by_role("heading", name=label, level=1)).to_be_visible(timeout=20000)
            expect(page.locator("#mode-badge")).to_have_text("Basic")
        expect(row).to_be_visible()
    finally:
        page.remove_listener("console", problems.console)
        page.remove_listener("requestfailed", problems.failed)
        page.remove_listener("response", problems.response)
    assert problems.seen == []


def test_logout_returns_to_login_and_ends_the_session(page: Page, basic_server: UiServer) -> None:
    base = basic_server.base
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(base + "/login**")
    expect(page.get_by_label("User name")).to_be_visible()
    # The old cookie, replayed by hand, no longer opens the API: the session ended on the server.
    request = urllib.request.Request(f"{base}/api/runs", headers={"Cookie": str(STATE["cookie"])})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401
    page.goto(base + "/new")
    assert page.url == base + "/login?next=%2Fnew"
