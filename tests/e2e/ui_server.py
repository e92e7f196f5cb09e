"""The real `backprop ui` server for browser tests: a home of its own, a free port, a clean stop.

Two caches under the temp folder keep the suite quick across sessions: the demo model (minutes
of CPU to build) and the front-end build (node_modules and bundle; the launcher rebuilds it when
the app's sources changed, and the npm install is the slow part it saves either way).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
UI_CACHE = Path(tempfile.gettempdir()) / "backprop-e2e-ui-build"
DEMO_CACHE = Path(tempfile.gettempdir()) / "backprop-e2e-demo-home"
READY = "Backpropagate is running: "


@dataclass
class UiServer:
    proc: subprocess.Popen
    base: str  # http://127.0.0.1:PORT
    login_url: str  # the URL the launcher printed (with ?token= in local mode)
    home: Path
    log: Path

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_models(home: Path) -> None:
    """Copy the demo model into ``home``, building it once per machine into the shared cache."""
    env = {**os.environ, "BACKPROPAGATE_HOME": str(DEMO_CACHE), "HF_HUB_OFFLINE": "1"}
    # Only the model the tests train, briefly pre-trained: its quality does not matter here.
    code = 'from backpropagate.models.demo import make_demo_models; make_demo_models(names=("demo-qwen2",), steps=20)'
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=900)
    shutil.copytree(DEMO_CACHE / "models", home / "models", dirs_exist_ok=True)


def _copy_ui_cache(target: Path) -> None:
    """Start from the shared front-end build. Another session may be swapping the cache for a
    newer build at this moment: try again, and build from scratch rather than fail."""
    for _ in range(3):
        if not UI_CACHE.is_dir():
            return
        try:
            shutil.copytree(UI_CACHE, target, symlinks=True)
            return
        except (OSError, shutil.Error):
            shutil.rmtree(target, ignore_errors=True)
            time.sleep(2)


def _build_stamp(ui_dir: Path) -> str:
    return "".join(sorted(p.read_text() for p in ui_dir.glob("*/.backprop-build")))


def refresh_ui_cache(home: Path) -> None:
    """Hand a new front-end build back to the shared cache, so the next server starts warm."""
    staged = UI_CACHE.with_name(f"{UI_CACHE.name}.{os.getpid()}")
    try:
        if not (home / "ui").is_dir() or (
            UI_CACHE.is_dir() and _build_stamp(UI_CACHE) == _build_stamp(home / "ui")
        ):
            return
        shutil.copytree(home / "ui", staged, symlinks=True, ignore=shutil.ignore_patterns(".states"))
        shutil.rmtree(UI_CACHE, ignore_errors=True)
        staged.rename(UI_CACHE)
    except (OSError, shutil.Error):  # only a speed-up: another session may have refreshed it first
        shutil.rmtree(staged, ignore_errors=True)


@contextmanager
def prepared_home(prefix: str) -> Iterator[Path]:
    """A fresh BACKPROPAGATE_HOME with the demo model and the cached front-end build; removed after
    (its front-end build with node_modules is ~150 MB)."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        _demo_models(home)
        _copy_ui_cache(home / "ui")
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def running_ui(
    home: Path, *args: str, log_name: str = "e2e-server.log", timeout_s: float = 420
) -> Iterator[UiServer]:
    """`backprop ui ARGS` on a free port in ``home`` until the block ends; stopped with its group.

    Its log is copied to the test artifacts at the end.
    """
    import pytest

    port = free_port()
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("BACKPROPAGATE_UI_LAUNCH", None)  # never an ambient launch file from the caller
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = home / log_name  # per server: another session may be running beside this one
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backpropagate", "ui", "--port", str(port), "--no-browser", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s  # a first build installs the front end (a minute or two)
        while READY not in (text := log.read_text(errors="replace")):
            if proc.poll() is not None:
                pytest.fail(f"backprop ui exited with {proc.returncode}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"backprop ui did not say it was running:\n{text[-3000:]}")
            time.sleep(0.5)
        printed = text.split(READY, 1)[1].split()[0]
        base = printed.split("?")[0].rstrip("/")
        assert base == f"http://127.0.0.1:{port}", printed
        yield UiServer(proc, base, printed, home, log)
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log, ARTIFACTS / log_name)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
