"""`backprop ui` end to end: build once, serve page + API + socket on one port, warm start, clean exit."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

URL_RE = re.compile(r"running: (http://\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ui:
    def __init__(self, proc: subprocess.Popen, out: Path, url: str, port: int, elapsed: float) -> None:
        self.proc, self.out, self.url, self.port, self.elapsed = proc, out, url, port, elapsed

    @property
    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def start_ui(home: Path, cwd: Path, *args: str, env_extra: dict[str, str] | None = None) -> Ui:
    port = free_port()
    out = cwd / f"ui-{port}.log"
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), **(env_extra or {})}
    env.pop("BACKPROPAGATE_UI_LAUNCH", None)
    start = time.monotonic()
    with out.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backpropagate", "ui", "--no-browser", "--port", str(port), *args],
            env=env,
            cwd=cwd,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    deadline = start + 400  # a cold first build installs node packages
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        if match := URL_RE.search(text):
            return Ui(proc, out, match.group(1), port, time.monotonic() - start)
        if proc.poll() is not None:
            pytest.fail(f"backprop ui exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"backprop ui printed no URL:\n{out.read_text()[-3000:]}")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def local_ui(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    ui = start_ui(home, tmp_path_factory.mktemp("cwd"))
    yield ui
    ui.stop()


def session_cookie(ui: Ui) -> str:
    status, headers, _ = fetch(ui.url)
    assert status == 303, "the token is exchanged for a session cookie"
    return headers["set-cookie"].split(";")[0]


def test_launcher_serves_page_socket_and_api_on_one_port(local_ui: Ui) -> None:
    assert local_ui.url.startswith(f"http://127.0.0.1:{local_ui.port}/?token=")
    assert f"ssh -L {local_ui.port}:localhost:{local_ui.port}" in local_ui.text
    base = f"http://127.0.0.1:{local_ui.port}"
    # Without credentials the guard answers, on every path (page, socket, API).
    for path in ("/", "/_event/?EIO=4&transport=polling", "/api/runs"):
        assert fetch(base + path)[0] in (401, 303), path
    cookie = session_cookie(local_ui)
    status, headers, body = fetch(base + "/", {"Cookie": cookie})
    assert status == 200 and b"<html" in body.lower()
    # The API is mounted on the same port, behind the same guard.
    status, _, body = fetch(base + "/api/runs", {"Cookie": cookie})
    assert status == 200 and body.startswith(b"[")
    # And so is Reflex's socket: the engine.io handshake arrives over the WebSocket.
    from websockets.sync.client import connect

    ws_url = f"ws://127.0.0.1:{local_ui.port}/_event/?EIO=4&transport=websocket"
    with connect(ws_url, additional_headers={"Cookie": cookie, "Origin": base}, open_timeout=10) as ws:
        opening = ws.recv(timeout=10)
    assert opening.startswith("0") and '"sid"' in opening


def test_launcher_refuses_a_second_launch_on_the_same_home(local_ui: Ui, home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "backpropagate", "ui", "--no-browser", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "[CONFIG_INVALID_SETTING]" in proc.stderr and f"pid {local_ui.proc.pid}" in proc.stderr
    assert fetch(local_ui.url)[0] == 303, "the running one is untouched"


def test_launcher_page_weight(local_ui: Ui) -> None:
    """Sum the bytes of the first page and the static assets it references (reported, bounded)."""
    base = f"http://127.0.0.1:{local_ui.port}"
    cookie = session_cookie(local_ui)
    _, _, html = fetch(base + "/", {"Cookie": cookie})
    assets = set(re.findall(rb'(?:src|href)="(/assets/[^"]+)"', html))
    assert assets, "the page links its bundle"
    total = len(html)
    for asset in assets:
        status, _, body = fetch(base + asset.decode(), {"Cookie": cookie})
        assert status == 200, asset
        total += len(body)
    print(f"\nfirst page: {len(assets)} assets linked, {total / 1024:.0f} KiB uncompressed")
    assert total < 5 * 1024 * 1024


def test_launcher_warm_start_reuses_the_build_and_cleans_up(local_ui: Ui, home: Path, tmp_path: Path) -> None:
    from backpropagate.launcher.workdir import sources_hash

    local_ui.stop()  # one launch per home
    assert start_ui(home, tmp_path).stop() == 0  # built (by the fixture or now)
    for _ in range(3):
        before = sources_hash()
        ui = start_ui(home, tmp_path)
        if sources_hash() == before:
            break
        ui.stop()  # the app's sources were edited meanwhile: a rebuild was right; try again
    try:
        assert "building the web front end" not in ui.text
        print(f"\nwarm start: URL printed after {ui.elapsed:.1f} s")
        assert fetch(ui.url)[0] == 303
        assert stat.S_IMODE((home / "ui.lock").stat().st_mode) == 0o600
    finally:
        assert ui.stop() == 0
    assert not (home / "ui.lock").exists(), "the launch file is removed on exit"
    with socket.socket() as s:  # the server's whole process group is gone: nothing listens
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        s.bind(("127.0.0.1", ui.port))
    written = [p.name for p in tmp_path.iterdir() if not p.name.startswith("ui-")]
    assert written == [], "nothing is written into the working directory"


def test_launcher_share_allows_the_tunnel_host(local_ui: Ui, home: Path, tmp_path: Path) -> None:
    local_ui.stop()  # one launch per home
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pid_file = tmp_path / "cf.pid"
    script = bin_dir / "cloudflared"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo $$ > {pid_file}
            echo "INF +----------------------------------------------------+" >&2
            echo "INF |  https://brave-owl-42.trycloudflare.com             |" >&2
            exec sleep 600
            """
        )
    )
    script.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    ui = start_ui(home, tmp_path, "--share", "--auth", "alice:a-long-password", env_extra=env)
    try:
        assert "token=" not in ui.url
        assert "Shared at: https://brave-owl-42.trycloudflare.com/" in ui.text
        base = f"http://127.0.0.1:{ui.port}"
        basic = "Basic " + base64.b64encode(b"alice:a-long-password").decode()
        # The tunnel forwards with the public Host header: allowed. Another host is refused.
        tunnel_host = {"Host": "brave-owl-42.trycloudflare.com", "Authorization": basic}
        assert fetch(base + "/", tunnel_host)[0] == 200
        assert fetch(base + "/", {"Host": "evil.example", "Authorization": basic})[0] in (400, 403, 421)
        assert fetch(base + "/", {"Host": "brave-owl-42.trycloudflare.com"})[0] in (401, 303)
        cf_pid = int(pid_file.read_text())
    finally:
        assert ui.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(cf_pid, 0)


def processes_under(folder: Path) -> list[int]:
    """Pids whose working directory lies inside ``folder``."""
    found = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc_dir / "cwd")).is_relative_to(folder):
                found.append(int(proc_dir.name))
        except OSError:
            continue
    return found


def test_launcher_sigterm_during_the_build_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "home"  # empty: this launch must build
    out = tmp_path / "ui.log"
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home)}
    env.pop("BACKPROPAGATE_UI_LAUNCH", None)
    with out.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backpropagate", "ui", "--no-browser", "--port", str(free_port())],
            env=env,
            cwd=tmp_path,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while not processes_under(home / "ui") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_under(home / "ui"), f"no build started:\n{out.read_text()}"
    assert (home / "ui.lock").exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "stopping" in out.read_text()
    time.sleep(0.5)
    assert processes_under(home / "ui") == [], "the build's process group was stopped"
    assert not (home / "ui.lock").exists()
