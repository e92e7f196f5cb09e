"""`server.host` / `server.port` (BACKPROPAGATE_SERVER__HOST / __PORT) are what `backprop ui` and
`backprop serve-api` bind when no flag is given; a flag wins over the setting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backprop(home: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "BACKPROPAGATE_HOME": str(home), **env}
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
    )


@pytest.mark.slow
def test_serve_api_listens_on_the_port_setting(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "BACKPROPAGATE_HOME": str(tmp_path / "home"),
        "BACKPROPAGATE_SERVER__PORT": str(port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "backpropagate", "serve-api", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=2).status_code == 200
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.time() < deadline, "serve-api did not listen on BACKPROPAGATE_SERVER__PORT"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(15)


def test_serve_api_host_setting_is_checked_like_the_flag(tmp_path):
    out = _backprop(tmp_path, "serve-api", BACKPROPAGATE_SERVER__HOST="0.0.0.0")
    assert out.returncode == 1 and "[RUNTIME_UI_AUTH_NOT_ENFORCED]" in out.stderr and "0.0.0.0" in out.stderr
    # The flag wins over the setting.
    out = _backprop(tmp_path, "serve-api", "--host", "0.0.0.0", BACKPROPAGATE_SERVER__HOST="127.0.0.1")
    assert out.returncode == 1 and "0.0.0.0" in out.stderr


def test_ui_binds_the_host_and_port_settings(tmp_path):
    # A non-loopback host from the setting, without credentials: refused as if --host had said it.
    out = _backprop(tmp_path, "ui", "--no-browser", BACKPROPAGATE_SERVER__HOST="0.0.0.0")
    assert out.returncode != 0 and "[RUNTIME_UI_AUTH_NOT_ENFORCED]" in out.stderr, out.stderr
    # The port setting is the one it tries to take: held here, so it says that port is busy.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = _backprop(tmp_path, "ui", "--no-browser", BACKPROPAGATE_SERVER__PORT=str(port))
        assert out.returncode != 0 and f"port {port}" in out.stderr, out.stderr
        free = _free_port()
        out = _backprop(
            tmp_path, "ui", "--no-browser", "--port", str(port), BACKPROPAGATE_SERVER__PORT=str(free)
        )
        assert f"port {port}" in out.stderr  # the flag wins
