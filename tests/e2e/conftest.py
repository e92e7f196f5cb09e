"""Browser tests: the real `backprop ui` server (subprocess, isolated home, free port) and Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
UI_CACHE = Path(tempfile.gettempdir()) / "backprop-e2e-ui-build"
URL_RE = re.compile(r"https?://\S+[?&]token=[\w-]+")


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict:
    """Debian's Chromium instead of a downloaded browser."""
    return {"executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UiServer:
    def __init__(self, proc: subprocess.Popen, base: str, login_url: str, home: Path, log: Path) -> None:
        self.proc, self.base, self.login_url, self.home, self.log = proc, base, login_url, home, log


def _demo_models(home: Path) -> None:
    """Copy the demo models into ``home``, building them once per machine into a shared cache.

    Building them takes minutes of CPU; without the cache every browser session would pay it
    inside its first run.
    """
    cache = Path(tempfile.gettempdir()) / "backprop-e2e-demo-home"
    env = {**os.environ, "BACKPROPAGATE_HOME": str(cache), "HF_HUB_OFFLINE": "1"}
    # Only the model the tests train, briefly pre-trained: its quality does not matter here.
    code = 'from backpropagate.models.demo import make_demo_models; make_demo_models(names=("demo-qwen2",), steps=20)'
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=900)
    shutil.copytree(cache / "models", home / "models", dirs_exist_ok=True)


@pytest.fixture(scope="session")
def ui_server() -> Iterator[UiServer]:
    """`backprop ui` in local mode on a free port with its own BACKPROPAGATE_HOME."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium")
    home = Path(tempfile.mkdtemp(prefix="backprop-e2e-home-"))
    _demo_models(home)
    # A previous session's front-end build (node_modules, bundle): the launcher rebuilds it when
    # the app's sources changed, and an npm install is the slow part it saves either way.
    if UI_CACHE.is_dir():
        shutil.copytree(UI_CACHE, home / "ui", symlinks=True)
    port = _free_port()
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ARTIFACTS.mkdir(exist_ok=True)
    log = home / "e2e-server.log"  # per session: another session may be running beside this one
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backpropagate", "ui", "--port", str(port), "--no-browser"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 420  # a first build installs the frontend (about a minute or two)
        login_url = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"backprop ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            match = URL_RE.search(log.read_text(errors="replace"))
            if match and f":{port}/" in match.group(0):
                login_url = match.group(0).replace("localhost", "127.0.0.1")
                break
            time.sleep(1)
        else:
            pytest.fail(f"backprop ui did not print its URL:\n{log.read_text()[-3000:]}")
        base = login_url.split("/?")[0].split("?")[0].rstrip("/")
        if (home / "ui").is_dir():
            staged = UI_CACHE.with_name(f"{UI_CACHE.name}.{os.getpid()}")
            shutil.copytree(home / "ui", staged, symlinks=True, ignore=shutil.ignore_patterns(".states"))
            shutil.rmtree(UI_CACHE, ignore_errors=True)
            staged.rename(UI_CACHE)
        yield UiServer(proc, base, login_url, home, log)
    finally:
        shutil.copy(log, ARTIFACTS / "e2e-server.log")
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        # the home holds a front-end build with its node_modules (~150 MB): do not leave it behind
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def ui(browser, ui_server):  # noqa: ANN001 - pytest-playwright's Browser
    """One signed-in page shared by a module's tests (the steps build on each other)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(ui_server.login_url)
    page.wait_for_url(f"{ui_server.base}/**")
    yield page
    context.close()
