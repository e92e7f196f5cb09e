"""The guard of `backprop serve-api` over real sockets: the attacks of issue 16, tried again.

Each server is a real `backprop serve-api` process on a free port (workers use the stand-in
engine). Covered: sockets closed after logout, cookies of another launch or port, per-account
backoff against rotating addresses, X-Forwarded-For only from the proxies Settings trusts, body
caps, NUL bytes, over-long URLs, preflights, and (as root) another OS user of this machine.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from test_api_server import _free_port
from test_worker_standin import standin_env
from websockets.sync.client import connect

pytestmark = pytest.mark.slow
PASSWORD = "correct horse battery"
TRUSTED_PROXY = "127.0.0.77"


@dataclass
class ApiServer:
    home: Path
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cookie_name(self) -> str:
        return f"backprop_session_{self.port}"

    def client(self, source: str = "127.0.0.1") -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=source)
        return httpx.Client(base_url=self.url, transport=transport, trust_env=False, timeout=30)

    def login(self, source: str = "127.0.0.1") -> str:
        """The session cookie's value, from a JSON login."""
        with self.client(source) as c:
            r = c.post(
                "/api/auth/login",
                json={"username": "alice", "password": PASSWORD},
                headers={"origin": self.origin},
            )
        assert r.status_code == 200, r.text
        return r.cookies[self.cookie_name]

    def token(self) -> str:
        text = self.log.read_text()
        return text.split("Authorization: Bearer ", 1)[1].split("`", 1)[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_api(home: Path, *args: str, port: int | None = None, **env: str) -> ApiServer:
    """`backprop serve-api ARGS` on a free (or the given) port; returns once it answers /ping."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    log = home.parent / f"serve-api-{port}-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backpropagate", "serve-api", "--port", str(port), "--log-level", "warning", *args],
            env=standin_env(BACKPROPAGATE_HOME=str(home), **env), stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = ApiServer(home, port, proc, log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-api exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + "/ping", timeout=2, trust_env=False).status_code < 500:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"serve-api did not answer:\n{log.read_text()}")


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """serve-api with an account, a small body cap and one trusted proxy address."""
    tmp = tmp_path_factory.mktemp("realserver-basic")
    server = start_api(
        tmp / "home",
        "--auth",
        f"alice:{PASSWORD}",
        BACKPROPAGATE_SERVER__MAX_REQUEST_KB="64",
        BACKPROPAGATE_SERVER__TRUSTED_PROXIES=f"{TRUSTED_PROXY}, 10.9.0.0/16",
    )
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------
# Sessions: open sockets after logout, cookies of another launch or port
# --------------------------------------------------------------------------------------------
def test_security_realserver_socket_closed_after_logout(basic: ApiServer) -> None:
    cookie = basic.login("127.0.0.31")
    headers = {"cookie": f"{basic.cookie_name}={cookie}"}
    uri = f"ws://127.0.0.1:{basic.port}/api/events"
    with connect(uri, origin=basic.origin, additional_headers=headers, open_timeout=15) as ws:
        ws.send("still here")  # the session is alive: nothing happens
        with basic.client("127.0.0.31") as c:
            r = c.post("/api/auth/logout", headers={**headers, "origin": basic.origin})
            assert r.status_code == 200
            assert c.get("/api/runs", headers=headers).status_code == 401
        ws.send("after logout")
        deadline = time.monotonic() + 15
        with pytest.raises(Exception) as closed:  # noqa: PT011 - ConnectionClosed, whichever kind
            while time.monotonic() < deadline:
                ws.recv(timeout=deadline - time.monotonic())
        assert ws.close_code == 1008, closed.value
    # A new socket with the old cookie is refused before it is accepted.
    with pytest.raises(Exception, match="403"):
        connect(uri, origin=basic.origin, additional_headers=headers, open_timeout=15)


def test_security_realserver_cookie_of_another_launch_or_port_refused(
    basic: ApiServer, tmp_path: Path
) -> None:
    cookie = basic.login("127.0.0.32")
    other = start_api(tmp_path / "home", "--auth", f"alice:{PASSWORD}")
    try:
        with other.client("127.0.0.32") as c:
            # Another instance on this host (browsers send a host's cookies to every port).
            for name in (other.cookie_name, basic.cookie_name):
                r = c.get("/api/runs", headers={"cookie": f"{name}={cookie}"})
                assert r.status_code == 401 and r.json()["code"] == "AUTH_REQUIRED"
        second_cookie = other.login("127.0.0.32")
        port = other.port
    finally:
        other.stop()
    # The next launch on the same port refuses the cookie the previous one gave out.
    relaunch = start_api(tmp_path / "home", "--auth", f"alice:{PASSWORD}", port=port)
    try:
        with relaunch.client("127.0.0.32") as c:
            r = c.get("/api/runs", headers={"cookie": f"{relaunch.cookie_name}={second_cookie}"})
            assert r.status_code == 401
            fresh = relaunch.login("127.0.0.32")
            assert (
                c.get("/api/runs", headers={"cookie": f"{relaunch.cookie_name}={fresh}"}).status_code == 200
            )
    finally:
        relaunch.stop()
    with basic.client("127.0.0.32") as c:  # and the first instance still honours its own cookie
        assert c.get("/api/runs", headers={"cookie": f"{basic.cookie_name}={cookie}"}).status_code == 200


# --------------------------------------------------------------------------------------------
# Login limits: per account, and per address only where Settings trusts a proxy
# --------------------------------------------------------------------------------------------
def _login(server: ApiServer, source: str, user: str, password: str, **headers: str) -> int:
    with server.client(source) as c:
        r = c.post(
            "/api/auth/login",
            json={"username": user, "password": password},
            headers={"origin": server.origin, **headers},
        )
    return r.status_code


def _until_refused(attempt, tries: int = 8) -> list[int]:
    """Codes of ``attempt(n)`` for n = 0, 1, ... until a 429 (or ``tries`` attempts).

    Limits refill with time, and on a loaded machine each password check takes a while, so a
    test counts "refused within a few more tries" rather than "refused at exactly the Nth".
    """
    codes: list[int] = []
    for n in range(tries):
        codes.append(attempt(n))
        if codes[-1] == 429:
            break
    return codes


def test_security_realserver_account_backs_off_whatever_the_address(basic: ApiServer) -> None:
    # Ten different wrong passwords for one account, each from a fresh loopback address: no
    # address is ever blocked, the account is (each further failure doubles its wait).
    codes = [_login(basic, f"127.0.40.{n}", "bob", f"guess-{n}") for n in range(1, 11)]
    assert codes == [401] * 10, codes
    later = _until_refused(lambda n: _login(basic, f"127.0.40.{50 + n}", "bob", f"guess-{50 + n}"))
    assert later[-1] == 429 and later.count(401) <= 3, later
    # Other accounts are not slowed down by it.
    assert _login(basic, "127.0.41.200", "alice", PASSWORD) == 200
    # Backoff, not lock-out: once the wait is over the account may try again.
    deadline = time.monotonic() + 60
    while (code := _login(basic, "127.0.40.99", "bob", f"guess-{time.monotonic()}")) == 429:
        assert time.monotonic() < deadline, "the account stayed locked"
        time.sleep(0.5)
    assert code == 401


def test_security_realserver_a_stale_password_does_not_slow_the_account(basic: ApiServer) -> None:
    # A script retrying one old password from many addresses is not guessing: each try is
    # wrong (401) without costing the account anything, so its owner still signs in at once.
    stale = "Basic " + base64.b64encode(b"alice:last year's password").decode()
    for n in range(1, 16):
        with basic.client(f"127.0.41.{n}") as c:
            assert c.get("/api/runs", headers={"authorization": stale}).status_code == 401
    assert _login(basic, "127.0.41.50", "alice", PASSWORD) == 200


def test_security_realserver_forwarded_for_only_from_trusted_proxies(basic: ApiServer) -> None:
    # Through the proxy that Settings trusts, each forwarded client has its own failed-login budget.
    client_a = {"x-forwarded-for": "203.0.113.5"}
    codes = _until_refused(lambda n: _login(basic, TRUSTED_PROXY, f"nobody-a{n}", "guess", **client_a))
    assert codes[-1] == 429 and 5 <= codes.count(401) <= 7, codes
    assert _login(basic, TRUSTED_PROXY, "nobody-b0", "guess", **{"x-forwarded-for": "203.0.113.6"}) == 401
    # A chain through two trusted hops names the client before them; a spoofed first hop is ignored.
    chain = {"x-forwarded-for": "198.51.100.1, 203.0.113.5, 10.9.0.3"}
    assert _login(basic, TRUSTED_PROXY, "nobody-c0", "guess", **chain) == 429
    # From any other peer the header is ignored: a new value per guess changes nothing.
    codes = _until_refused(
        lambda n: _login(basic, "127.0.0.78", f"nobody-d{n}", "guess", **{"x-forwarded-for": f"192.0.2.{n}"})
    )
    assert codes[-1] == 429 and 5 <= codes.count(401) <= 7, codes


# --------------------------------------------------------------------------------------------
# Request shape: body cap, NUL bytes, over-long URLs, preflights
# --------------------------------------------------------------------------------------------
def test_security_realserver_request_shape_refused_with_codes(basic: ApiServer) -> None:
    auth = ("alice", PASSWORD)
    with basic.client("127.0.0.33") as c:
        big = b'{"model": "' + b"A" * (200 * 1024) + b'"}'
        r = c.post("/api/runs", content=big, auth=auth, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "INPUT_REQUEST_TOO_LARGE"

        def chunked():  # no Content-Length: the running count stops it
            for _ in range(200):
                yield b"A" * 4096

        r = c.post("/api/runs", content=chunked(), auth=auth, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "INPUT_REQUEST_TOO_LARGE"
        assert "A" * 100 not in r.text

        r = c.get("/api/runs/x/exports/y/download", params={"file": "a\x00b"}, auth=auth)
        assert r.status_code == 400 and r.json()["code"] == "INPUT_URL_INVALID"
        r = c.get("/api/runs/%00", auth=auth)
        assert r.status_code == 400 and r.json()["code"] == "INPUT_URL_INVALID"
        long_path = "/api/runs/" + "B" * 5000
        r = c.get(long_path, auth=auth)
        assert r.status_code == 414 and r.json()["code"] == "INPUT_URL_TOO_LONG"
        assert "B" * 100 not in r.text  # never echoed

        # A preflight goes through the guard like any request: no CORS grant, Host checked.
        preflight = {"origin": "http://evil.example", "access-control-request-method": "POST"}
        r = c.options("/api/runs", headers=preflight)
        assert r.status_code == 401 and "access-control-allow-origin" not in r.headers
        assert "content-security-policy" in r.headers
        r = c.options("/api/runs", headers={**preflight, "host": "evil.example"})
        assert r.status_code == 421
        assert c.get("/api/runs", auth=auth).status_code == 200  # the server is fine
    assert "Traceback" not in basic.log.read_text()


def test_security_realserver_refuses_non_loopback_without_auth(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "backpropagate", "serve-api", "--host", "0.0.0.0", "--port", str(_free_port())],
        env=standin_env(BACKPROPAGATE_HOME=str(tmp_path)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "[RUNTIME_UI_AUTH_NOT_ENFORCED]" in out.stderr and "hint: " in out.stderr


# --------------------------------------------------------------------------------------------
# Local mode: this user's processes get in, another OS user needs the token
# --------------------------------------------------------------------------------------------
def _as_user(uid: int, url: str, *headers: str) -> str:
    """The HTTP status curl gets for ``url`` when run as OS user ``uid``."""
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--noproxy", "*", url]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(
        args, user=uid, group=uid, capture_output=True, text=True, timeout=60, cwd="/", env={}
    )
    return out.stdout


def test_security_realserver_local_mode_tells_users_apart(tmp_path: Path) -> None:
    server = start_api(tmp_path / "home")
    try:
        assert httpx.get(server.url + "/api/runs", trust_env=False).status_code == 200  # this user
        assert (
            httpx.post(server.url + "/api/runs", json={}, trust_env=False).status_code == 422
        )  # no Origin: a script
        r = httpx.post(
            server.url + "/api/runs", json={}, headers={"origin": "http://evil.example"}, trust_env=False
        )
        assert r.status_code == 403  # a page on another site
        # Through a proxy (whoever runs it) the visitor behind it is not this user.
        r = httpx.get(server.url + "/api/runs", headers={"x-forwarded-for": "192.0.2.1"}, trust_env=False)
        assert r.status_code == 401
        if os.getuid() != 0 or shutil.which("curl") is None:
            pytest.skip("checking another OS user needs root (to run curl as `nobody`)")
        assert _as_user(65534, server.url + "/api/runs") == "401"
        assert _as_user(65534, server.url + "/api/runs", f"Authorization: Bearer {server.token()}") == "200"
    finally:
        server.stop()
