"""Start the real `backprop ui` (Reflex production server) in one auth mode and talk to it.

Each mode gets its own BACKPROPAGATE_HOME; their front-end build folders all point at one shared
folder so the web front end is built once per machine (and again only when its sources change).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backpropagate import __version__

PASSWORD = "correct horse battery"
TUNNEL_HOST = "brave-owl-42.trycloudflare.com"
BUILD_CACHE = Path(tempfile.gettempdir()) / "backprop-realapp-ui-build"
# The browser tests keep a build too: seeding from it saves the npm install on a first run.
E2E_CACHE = Path(tempfile.gettempdir()) / "backprop-e2e-ui-build"
URL_RE = re.compile(r"Backpropagate is running: (http://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_next_source = [0]


def fresh_source() -> str:
    """A loopback address no request used before: the guard's per-address limits start empty."""
    _next_source[0] += 1
    n = _next_source[0] + os.getpid() % 50 * 5000
    return f"127.{10 + n // 65536 % 200}.{n // 256 % 256}.{n % 256 or 1}"


def shared_build_folder() -> Path:
    """This checkout's build folder: other checkouts (other sources) build in their own."""
    checkout = hashlib.sha256(str(Path(__file__).resolve().parent).encode()).hexdigest()[:12]
    folder = BUILD_CACHE / checkout / __version__
    if not folder.exists():
        seed = E2E_CACHE / __version__
        if seed.is_dir():
            shutil.copytree(seed, folder, symlinks=True, ignore=shutil.ignore_patterns(".states"))
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def stand_in_cloudflared(bin_dir: Path, pid_file: Path) -> None:
    """A `cloudflared` that announces a quick-tunnel URL on stderr the way the real one does."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "cloudflared"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo $$ > {pid_file}
            echo "INF Requesting new quick Tunnel on trycloudflare.com..." >&2
            echo "INF +--------------------------------------------------------------------------------------------+" >&2
            echo "INF |  Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):  |" >&2
            echo "INF |  https://{TUNNEL_HOST}                                                      |" >&2
            echo "INF +--------------------------------------------------------------------------------------------+" >&2
            exec sleep 3600
            """
        )
    )
    script.chmod(0o755)


@dataclass
class RealApp:
    mode: str
    port: int
    home: Path
    proc: subprocess.Popen
    url: str
    output: Path
    token: str | None = None
    cookie: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """The Host a browser sends in this mode (the tunnel's public name when shared)."""
        return TUNNEL_HOST if self.mode == "shared" else f"localhost:{self.port}"

    @property
    def origin(self) -> str:
        return f"https://{TUNNEL_HOST}" if self.mode == "shared" else f"http://localhost:{self.port}"

    @property
    def server_log(self) -> Path:
        return self.home / "ui" / "server.log"

    def client(self, source: str | None = None) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=source or fresh_source())
        return httpx.Client(
            base_url=self.base,
            trust_env=False,
            transport=transport,
            headers={"host": self.host},
            follow_redirects=False,
            timeout=60,
        )

    def good_authorization(self) -> str:
        if self.mode == "local":
            return f"Bearer {self.token}"
        return "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()

    def bad_authorization(self) -> str:
        if self.mode == "local":
            return "Bearer wrong-token"
        return "Basic " + base64.b64encode(b"alice:wrong password").decode()

    def login(self) -> str:
        """A live session cookie (``name=value``), obtained the way a browser would."""
        with self.client() as c:
            if self.mode == "local":
                r = c.get("/", params={"token": self.token})
            else:
                r = c.post(
                    "/api/auth/login",
                    json={"username": "alice", "password": PASSWORD},
                    headers={"origin": self.origin},
                )
        assert r.status_code in (200, 303), r.text
        return r.headers["set-cookie"].split(";")[0]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the launcher stops its server and tunnel
            try:
                return self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_real_app(tmp: Path, mode: str, timeout: float = 480) -> RealApp:
    """`backprop ui` in ``mode`` (local, basic or shared) on a free port; returns once it printed its URL."""
    home = tmp / "home"
    (home / "ui").mkdir(parents=True, exist_ok=True)
    (home / "ui" / __version__).symlink_to(shared_build_folder(), target_is_directory=True)
    port = free_port()
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env["BACKPROPAGATE_SERVER__MAX_UPLOAD_MB"] = "1"  # the oversize upload test sends just over 1 MiB
    env.pop("BACKPROPAGATE_UI_LAUNCH", None)
    args = [sys.executable, "-m", "backpropagate", "ui", "--no-browser", "--port", str(port)]
    extra: dict = {}
    if mode in ("basic", "shared"):
        args += ["--auth", f"alice:{PASSWORD}"]
    if mode == "shared":
        args.append("--share")
        extra["cloudflared_pid"] = tmp / "cloudflared.pid"
        stand_in_cloudflared(tmp / "bin", extra["cloudflared_pid"])
        env["PATH"] = f"{tmp / 'bin'}{os.pathsep}{env['PATH']}"
    output = tmp / "backprop-ui.out"
    # One build at a time in the shared folder: a second test run waits until the first one's
    # server is up (the build is then reused) instead of building over it.
    with build_lock():
        with output.open("wb") as fh:
            proc = subprocess.Popen(
                args, env=env, cwd=tmp, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        return _wait_for_url(proc, output, mode, port, home, extra, timeout)


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    with (shared_build_folder().parent / "build.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _wait_for_url(
    proc: subprocess.Popen, output: Path, mode: str, port: int, home: Path, extra: dict, timeout: float
) -> RealApp:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = output.read_text(errors="replace")
        if match := URL_RE.search(text):
            url = match.group(1)
            token = url.split("token=", 1)[1] if "token=" in url else None
            return RealApp(mode, port, home, proc, url, output, token=token, extra=extra)
        if proc.poll() is not None:
            raise RuntimeError(f"backprop ui exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"backprop ui printed no URL:\n{output.read_text(errors='replace')[-3000:]}")


# --------------------------------------------------------------------------------------------
# WebSockets
# --------------------------------------------------------------------------------------------
async def _ws_open(
    app: RealApp,
    path: str,
    host: str,
    headers: dict[str, str],
    origin: str | None,
    read_first: bool,
    source: str,
) -> tuple[int, str | None]:
    import websockets
    from websockets.asyncio.client import connect

    try:
        async with connect(
            f"ws://{host}{path}",
            origin=origin,
            additional_headers=headers,
            proxy=None,
            host="127.0.0.1",
            port=app.port,
            local_addr=(source, 0),
            open_timeout=30,
        ) as ws:
            if not read_first:
                return 101, None
            try:
                first = await asyncio.wait_for(ws.recv(), 15)
            except (TimeoutError, websockets.ConnectionClosed):
                first = None
            return 101, first if isinstance(first, str) else None
    except websockets.InvalidStatus as exc:
        return exc.response.status_code, None


def ws_open(
    app: RealApp, path: str, host: str, headers: dict[str, str], origin: str | None, read_first: bool = True
) -> tuple[int, str | None]:
    """The handshake's status (101 accepted, else refused before accept) and the first text frame."""
    return asyncio.run(_ws_open(app, path, host, headers, origin, read_first, fresh_source()))
