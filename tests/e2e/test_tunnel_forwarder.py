"""Through a tunnel on another port, the page still reaches its own backend (socket and all).

`ssh -L 9000:localhost:7860` serves the page on :9000; Reflex alone would open its socket on the
baked :7860 and fail. Here a TCP forwarder stands in for the SSH tunnel, and Chromium must load
the page *and* run the /_event socket through the forwarder's port only.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

URL_RE = re.compile(r"running: http://127\.0\.0\.1:(\d+)/\?token=([\w-]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Forwarder:
    """A byte-for-byte TCP forwarder (what `ssh -L` does), run by asyncio in a thread."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port, self.target_port = listen_port, target_port
        self.connections = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        self.ready.set()
        await self._stop.wait()
        server.close()
        # Cancel the open pipes and wait for them; new connections may still arrive meanwhile.
        current = asyncio.current_task()
        while tasks := [t for t in asyncio.all_tasks() if t is not current]:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> Forwarder:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def backend(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """`backprop ui` (local mode) on port A; yields (A, token)."""
    port = free_port()
    log = tmp_path_factory.mktemp("tunnel") / "ui.log"
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home)}
    env.pop("BACKPROPAGATE_UI_LAUNCH", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backpropagate", "ui", "--no-browser", "--port", str(port)],
            env=env,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 400
        while not (match := URL_RE.search(log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"backprop ui did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        assert int(match.group(1)) == port
        yield port, match.group(2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_tunnel_page_and_socket_use_the_forwarded_port(backend: tuple[int, str], page) -> None:  # noqa: ANN001
    port_a, token = backend
    port_b = free_port()
    sockets: list[str] = []
    frames: list[str] = []
    failed: list[str] = []

    def on_websocket(ws) -> None:  # noqa: ANN001
        sockets.append(ws.url)
        ws.on("framereceived", lambda payload: frames.append(str(payload)[:200]))
        ws.on("socketerror", lambda error: failed.append(f"{ws.url}: {error}"))

    page.on("websocket", on_websocket)
    with Forwarder(port_b, port_a) as forwarder:
        page.goto(f"http://localhost:{port_b}/?token={token}")
        page.wait_for_url(f"http://localhost:{port_b}/")  # token exchanged, cookie set on :B
        page.wait_for_load_state("networkidle")
        # The socket.io handshake ("0{...sid...}") then the namespace connect ("40...").
        deadline = time.monotonic() + 30
        while not any(f.startswith("40") for f in frames) and time.monotonic() < deadline:
            page.wait_for_timeout(250)
        assert sockets, "the page opened no WebSocket"
        assert all(url.startswith(f"ws://localhost:{port_b}/_event") for url in sockets), sockets
        assert not failed, failed
        assert any(f.startswith("0") and '"sid"' in f for f in frames), frames
        assert any(f.startswith("40") for f in frames), frames
        # The app hydrated over that socket: no connection-error banner.
        page.wait_for_timeout(1000)
        assert page.get_by_text("Cannot connect to server").count() == 0
        assert forwarder.connections > 0
