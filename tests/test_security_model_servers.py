"""The model servers (Export → serve, Chat, `backprop serve`) against real llama_cpp.server processes.

Another local user, or a web page in the user's browser, must not be able to use them: each
server the app starts has its own API key (never on a command line), answers no foreign Origin
or Host, and `backprop serve` never leaves one behind or opens one to the network without a key.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from test_export_support import qwen2_run  # noqa: F401 - fixture

from backpropagate.export import export_run, stream_chat
from backpropagate.export.serve import free_port, serve_command, server_key, wait_ready

pytest.importorskip("llama_cpp.server")
pytestmark = pytest.mark.slow
BACKPROP = [sys.executable, "-c", "from backpropagate.cli import main; main()"]
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def gguf(qwen2_run: Path) -> Path:  # noqa: F811
    return Path(export_run(qwen2_run, "gguf", "q8_0", verify=False).path)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def test_security_app_model_server_needs_its_key(gguf: Path) -> None:
    port = free_port()
    command = serve_command(gguf, port)
    base = f"http://127.0.0.1:{port}"
    key = server_key(base)
    assert key and not any(key in arg for arg in command)  # `ps` shows a file name, not the key
    key_file = Path(command[command.index("--api-key-file") + 1])
    assert key_file.stat().st_mode & 0o077 == 0
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_ready(base, 120, proc)
        assert not key_file.exists()  # read into memory, then removed
        assert key not in " ".join(psutil.Process(proc.pid).cmdline())

        # Another local user (or anything without the key): nothing, not even the model's path.
        r = httpx.get(f"{base}/v1/models", trust_env=False)
        assert r.status_code == 401 and str(gguf) not in r.text
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": MESSAGES}, trust_env=False)
        assert r.status_code == 401
        # This process holds the key, so the app's chat works.
        list(stream_chat(base, MESSAGES, max_tokens=4, temperature=0.0))  # raises on a refusal

        # A page on another site: no CORS grant, no cross-site POST, no rebinding.
        with_key = {"authorization": f"Bearer {key}"}
        evil = {"origin": "http://evil.example"}
        r = httpx.options(
            f"{base}/v1/chat/completions",
            headers={**evil, "access-control-request-method": "POST", "access-control-request-headers": "authorization"},
            trust_env=False,
        )  # fmt: skip
        assert "access-control-allow-origin" not in r.headers
        r = httpx.get(f"{base}/v1/models", headers={**with_key, **evil}, trust_env=False)
        assert "access-control-allow-origin" not in r.headers
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={"messages": MESSAGES},
            headers={**with_key, **evil},
            trust_env=False,
        )
        assert r.status_code == 403 and r.json()["code"] == "AUTH_ORIGIN_FORBIDDEN"
        r = httpx.get(f"{base}/v1/models", headers={**with_key, "host": "evil.example"}, trust_env=False)
        assert r.status_code == 421 and r.json()["code"] == "AUTH_HOST_FORBIDDEN"
    finally:
        _stop(proc)


def test_security_serve_refuses_a_network_host_without_a_key(tmp_path: Path) -> None:
    out = subprocess.run(
        [*BACKPROP, "serve", str(tmp_path / "none.gguf"), "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "[RUNTIME_UI_AUTH_NOT_ENFORCED]" in out.stderr and "--api-key-file" in out.stderr
    assert "hint: " in out.stderr
    # A key file every user can read is no secret: refused too.
    key_file = tmp_path / "key.txt"
    key_file.write_text("k-123\n")
    key_file.chmod(0o644)
    out = subprocess.run(
        [*BACKPROP, "serve", str(tmp_path / "none.gguf"), "--host", "0.0.0.0", "--api-key-file", str(key_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and "[INPUT_AUTH_INVALID_SHAPE]" in out.stderr and "chmod 600" in out.stderr


def _serve(gguf: Path, port: int, key: str, tmp: Path) -> tuple[subprocess.Popen, psutil.Process]:
    """`backprop serve` with a key (from a private file); returns it and its model server child."""
    key_file = tmp / f"key-{port}.txt"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    proc = subprocess.Popen(
        [*BACKPROP, "serve", str(gguf), "--port", str(port), "--api-key-file", str(key_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}", 120, proc, api_key=key)
    (child,) = [c for c in psutil.Process(proc.pid).children() if "model_server" in " ".join(c.cmdline())]
    return proc, child


def _gone(child: psutil.Process, port: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.is_running() or child.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1, trust_env=False)
                return False
            return True
        time.sleep(0.2)
    return False


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_security_serve_never_leaves_its_server_behind(
    gguf: Path, how: signal.Signals, tmp_path: Path
) -> None:
    port, key = free_port(), "k-" + os.urandom(8).hex()
    proc, child = _serve(gguf, port, key, tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/v1/models", trust_env=False).status_code == 401
        list(stream_chat(base, MESSAGES, max_tokens=4, api_key=key))  # raises on a refusal
        assert key not in " ".join(child.cmdline()) + " ".join(psutil.Process(proc.pid).cmdline())
        proc.send_signal(how)  # only the parent: the server must follow it
        proc.wait(30)
        assert _gone(child, port), f"the model server outlived `backprop serve` ({how.name})"
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
        _stop(proc)
