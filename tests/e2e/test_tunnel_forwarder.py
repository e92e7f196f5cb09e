"""Through a tunnel on another port, the page still reaches its own backend (socket and all).

`ssh -L 9000:localhost:7860` serves the page on :9000; Reflex alone would open its socket on the
baked :7860 and fail. Here a TCP forwarder stands in for the SSH tunnel, and Chromium must load
the page *and* run the /_event socket through the forwarder's port only.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from ui_server import free_port, prepared_home, refresh_ui_cache, running_ui

pytestmark = [pytest.mark.slow, pytest.mark.browser]


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
def backend() -> Iterator[tuple[int, str]]:
    """`backprop ui` (local mode) on port A; yields (A, token)."""
    with (
        prepared_home("backprop-e2e-tunnel-") as home,
        running_ui(home, log_name="e2e-tunnel-server.log") as ui,
    ):
        refresh_ui_cache(home)
        yield ui.port, ui.login_url.split("token=", 1)[1]


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
