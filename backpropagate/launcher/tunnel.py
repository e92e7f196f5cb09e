"""`--share`: a Cloudflare quick tunnel (`cloudflared tunnel --url ...`) to the local server."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from backpropagate.errors import BackpropError, ErrorCode

_URL = re.compile(r"https://[a-z0-9-]+\.trycloudflare\.com")


class Tunnel:
    """A running cloudflared process and the public URL it announced."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process = process
        self.url = url

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or ""

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start(port: int, log_path: Path, timeout: float = 30.0) -> Tunnel:
    """Start cloudflared for ``http://127.0.0.1:port`` and wait for its public URL."""
    exe = shutil.which("cloudflared")
    if exe is None:
        raise BackpropError(
            ErrorCode.DEP_TUNNEL_FAILED,
            "--share needs `cloudflared` on PATH and it was not found",
            hint=f"Install cloudflared, or use an SSH tunnel: `ssh -L {port}:localhost:{port} HOST`.",
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [exe, "tunnel", "--no-autoupdate", "--url", f"http://127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        # cloudflared logs to stderr for its whole life; keep draining it into the log.
        assert process.stdout is not None
        with log_path.open("a") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if not found and (match := _URL.search(line)):
                    found.append(match.group(0))
                    ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True, name="cloudflared-log").start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.2) and time.monotonic() < deadline:
        pass
    if not found:
        tunnel = Tunnel(process, "")
        tunnel.stop()
        raise BackpropError(
            ErrorCode.DEP_TUNNEL_FAILED,
            f"cloudflared announced no https://*.trycloudflare.com URL within {timeout:.0f} s "
            f"(its output is in {log_path})",
            hint=f"Check the network, or use an SSH tunnel: `ssh -L {port}:localhost:{port} HOST`.",
        )
    return Tunnel(process, found[0])
