"""The built wheel runs `backprop ui` from site-packages, writing only under BACKPROPAGATE_HOME."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def listing(root: Path) -> set[str]:
    # Byte-code caches are the interpreter's, not ours.
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if "__pycache__" not in p.parts}


def run(*cmd: str | Path, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def test_launcher_wheel_serves_from_site_packages(tmp_path: Path) -> None:
    # Build from a copy so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", ".web", ".states", "*.egg-info")
    for name in ("backpropagate", "ui_app"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        tmp_path / "dist",
        src,
    )
    wheel = next((tmp_path / "dist").glob("backpropagate-*.whl"))

    # A fresh venv whose dependencies come from this one through a .pth line (no downloads).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "_deps_from_dev_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel)
    where = run(
        python,
        "-c",
        "import backpropagate, ui_app.rxconfig as r; print(backpropagate.__file__, r.__file__)",
        cwd=tmp_path,
    )
    assert all(path.startswith(str(site)) for path in where.stdout.split()), where.stdout

    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    site_before, cwd_before = listing(site), listing(cwd)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("BACKPROPAGATE_UI_LAUNCH", "PYTHONPATH")}
    env.update(BACKPROPAGATE_HOME=str(home), PYTHONDONTWRITEBYTECODE="1", PATH="/usr/bin:/bin")
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [venv / "bin" / "backprop", "ui", "--no-browser", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 400
        while not (match := re.search(r"running: (http://\S+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"backprop ui did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        with urllib.request.urlopen(match.group(1), timeout=10) as resp:  # follows the token redirect
            assert resp.status == 200
            assert b"<html" in resp.read().lower()
    except urllib.error.HTTPError as err:
        pytest.fail(f"page answered {err.code}:\n{log.read_text()[-2000:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    assert listing(site) == site_before, "nothing is written into site-packages"
    assert listing(cwd) == cwd_before == set(), "nothing is written into the working directory"
    assert (home / "ui" / "0.1.0" / ".web" / "build" / "client" / "index.html").is_file()
