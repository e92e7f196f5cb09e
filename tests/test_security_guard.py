"""The guard against a real uvicorn process: the full request matrix per mode, sessions, brute force.

Run as a script, this file is the server: ``python tests/test_security_guard.py PORT [relaxed]``
serves ``build_guard(app, load_launch_policy())`` where ``app`` is the API's ``create_app()``
plus a page at ``/`` and a socket at ``/_event`` standing in for Reflex's.
"""

import asyncio
import base64
import itertools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from backpropagate.server.security.policy import SecurityPolicy

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------
def build_test_app():  # pragma: no cover - runs in the server process
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request, WebSocket
    from fastapi.responses import HTMLResponse

    try:
        from backpropagate.server.app import create_app

        app = create_app()
    except ImportError:
        app = FastAPI()

        @app.get("/api/runs")
        async def runs() -> list:
            return []

        @app.websocket("/api/events")
        async def events(ws: WebSocket) -> None:
            await ws.accept()
            await ws.close()

    outer_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        a.state.lifespan_ran = True  # proves lifespan events pass through the guard
        async with outer_lifespan(a) as state:
            yield state

    app.router.lifespan_context = lifespan

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse("<!doctype html><title>app</title><p>the app page</p>")

    @app.get("/ping")
    async def ping() -> dict:
        return {"pong": True}

    @app.api_route("/api/test/echo", methods=["GET", "POST"])
    async def echo(request: Request) -> dict:
        return {
            "user": request.scope.get("backprop.user"),
            "authorization": request.headers.get("authorization"),
            "cookie": request.headers.get("cookie"),
            "lifespan_ran": getattr(request.app.state, "lifespan_ran", False),
        }

    @app.websocket("/_event")
    async def reflex_event(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    return app


def serve(port: int, relaxed: bool) -> None:  # pragma: no cover - runs in the server process
    import uvicorn

    from backpropagate.server.security import build_guard, load_launch_policy

    limits = {"login_failures_per_minute": 100_000, "requests_burst": 100_000} if relaxed else {}
    guard = build_guard(build_test_app(), load_launch_policy(), **limits)
    uvicorn.run(guard, host="127.0.0.1", port=port, log_level="warning", proxy_headers=False)


# --------------------------------------------------------------------------------------------
# Test helpers
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    port: int
    mode: str
    token: str | None
    proc: subprocess.Popen
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"localhost:{self.port}"

    @property
    def origin(self) -> str:
        return f"http://localhost:{self.port}"

    def client(self, source: str | None = None) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=source) if source else None
        return httpx.Client(
            base_url=self.base,
            trust_env=False,
            transport=transport,
            headers={"host": self.host},
            follow_redirects=False,
            timeout=30,
        )


def start_server(tmp: Path, policy: SecurityPolicy, token: str | None, relaxed: bool) -> Server:
    from backpropagate.server.security.policy import write_launch_file

    written = write_launch_file(policy, token)
    launch = tmp / f"launch-{policy.port}.json"
    os.replace(written, launch)  # keeps 0600; one file per server
    # A home each: several of these servers run at once, and a home has at most one server.
    home = tmp / f"home-{policy.port}"
    env = {
        **os.environ,
        "BACKPROPAGATE_UI_LAUNCH": str(launch),
        "PYTHONPATH": str(REPO),
        "BACKPROPAGATE_HOME": str(home),
    }
    args = [sys.executable, __file__, str(policy.port)] + (["relaxed"] if relaxed else [])
    log = open(tmp / f"server-{policy.port}.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    server = Server(policy.port, policy.mode, token, proc, tmp / f"server-{policy.port}.log")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / f"server-{policy.port}.log").read_text())
        try:
            with server.client() as c:
                if c.get("/ping").status_code == 200:
                    return server
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the test server did not start")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()


def make_policy(mode: str, port: int, session_hours: float = 12.0) -> tuple[SecurityPolicy, str | None]:
    from backpropagate.server.security.policy import new_token, resolve_policy

    auth = None if mode == "local" else f"alice:{PASSWORD}"
    policy = resolve_policy(
        host="127.0.0.1", port=port, auth=auth, auth_file=None, users_file=None, share=False
    )
    policy = policy.model_copy(update={"session_hours": session_hours})
    return policy, (new_token() if mode == "local" else None)


def login_cookie(server: Server, source: str | None = None) -> str:
    """A live session cookie (``name=value``), obtained the way a browser would."""
    with server.client(source) as c:
        if server.mode == "local":
            r = c.get("/", params={"token": server.token})
        else:
            r = c.post(
                "/api/auth/login",
                json={"username": "alice", "password": PASSWORD},
                headers={"origin": server.origin},
            )
    assert r.status_code in (200, 303), r.text
    return r.headers["set-cookie"].split(";")[0]


async def _ws_status(uri: str, headers: dict[str, str], origin: str | None, port: int) -> int:
    import websockets
    from websockets.asyncio.client import connect

    try:
        async with connect(
            uri,
            origin=origin,
            additional_headers=headers,
            proxy=None,
            host="127.0.0.1",
            port=port,
            open_timeout=15,
        ):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


def ws_status(server: Server, path: str, host: str, headers: dict[str, str], origin: str | None) -> int:
    """HTTP status of the WebSocket handshake: 101 accepted, 403 refused before accept."""
    return asyncio.run(_ws_status(f"ws://{host}{path}", headers, origin, server.port))


@pytest.fixture(scope="module", params=["local", "basic"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp(f"guard-{request.param}")
    policy, token = make_policy(request.param, free_port())
    srv = start_server(tmp, policy, token, relaxed=True)
    srv.cookie = login_cookie(srv)  # type: ignore[attr-defined]
    yield srv
    stop_server(srv)


# --------------------------------------------------------------------------------------------
# The matrix: route x credentials x Host x Origin
# --------------------------------------------------------------------------------------------
ROUTES = {
    "api_get": ("GET", "/api/runs"),
    "api_post": ("POST", "/api/test/echo"),
    "page": ("GET", "/"),
    "ws_events": ("WS", "/api/events"),
    "ws_reflex": ("WS", "/_event"),
}
CREDS = ["none", "bad_header", "good_header", "bad_cookie", "good_cookie"]
HOSTS = ["allowed", "foreign", "ip_literal"]
ORIGINS = ["same", "foreign", "none"]


def expected(route: str, creds: str, host: str, origin: str) -> int:
    """What the guard must answer for one cell (101 = WebSocket accepted, 403 = refused)."""
    method = ROUTES[route][0]
    ws = method == "WS"
    if host != "allowed":
        return 403 if ws else 421
    if ws or method == "POST":
        if origin == "foreign":
            return 403
        if origin == "none" and (ws or not creds.endswith("_header")):
            return 403
    if creds.startswith("good"):
        return 101 if ws else 200
    if ws:
        return 403
    if creds == "bad_header":
        return 401
    return 303 if route == "page" else 401  # no credentials, or a cookie that proves nothing


def cell_headers(server: Server, creds: str) -> dict[str, str]:
    if creds == "good_cookie":
        return {"cookie": server.cookie}  # type: ignore[attr-defined]
    if creds == "bad_cookie":
        name = server.cookie.split("=")[0]  # type: ignore[attr-defined]
        return {"cookie": f"{name}=Zm9v.AAAAAA.tampered"}
    if creds in ("good_header", "bad_header"):
        if server.mode == "local":
            return {"authorization": f"Bearer {server.token if creds == 'good_header' else 'wrong-token'}"}
        pw = PASSWORD if creds == "good_header" else "wrong password"
        return {"authorization": "Basic " + base64.b64encode(f"alice:{pw}".encode()).decode()}
    return {}


CELLS = list(itertools.product(ROUTES, CREDS, HOSTS, ORIGINS))


@pytest.mark.parametrize(("route", "creds", "host", "origin"), CELLS, ids=["-".join(c) for c in CELLS])
def test_security_matrix(server: Server, route: str, creds: str, host: str, origin: str) -> None:
    method, path = ROUTES[route]
    host_header = {
        "allowed": server.host,
        "foreign": f"evil.example:{server.port}",
        "ip_literal": "192.168.7.9",
    }[host]
    origin_value = {"same": f"http://{host_header}", "foreign": "http://evil.example", "none": None}[origin]
    headers = cell_headers(server, creds)
    want = expected(route, creds, host, origin)
    if method == "WS":
        got = ws_status(server, path, host_header, headers, origin_value)
        assert got == want, f"{route} {creds} {host} {origin}: got {got}, want {want}"
        return
    headers["host"] = host_header
    if origin_value:
        headers["origin"] = origin_value
    with server.client() as c:
        r = c.request(method, path, headers=headers, json={"x": 1} if method == "POST" else None)
    assert r.status_code == want, f"{route} {creds} {host} {origin}: {r.status_code} {r.text[:200]}"
    code = {421: "AUTH_HOST_FORBIDDEN", 403: "AUTH_ORIGIN_FORBIDDEN"}.get(want)
    if want == 401:
        code = "AUTH_INVALID_CREDENTIALS" if creds == "bad_header" else "AUTH_REQUIRED"
    if code:
        assert r.json()["code"] == code
    if want == 303:
        assert r.headers["location"].startswith("/login?next=")
    if want == 200 and route == "api_post":
        body = r.json()
        # The app behind the guard learns the user, never the credentials.
        assert body["user"] == ("local" if server.mode == "local" else "alice")
        assert body["authorization"] is None and body["cookie"] is None
    assert r.headers["x-frame-options"] == "DENY"  # refusals carry the headers too


# --------------------------------------------------------------------------------------------
# Sessions, token exchange, login form, headers
# --------------------------------------------------------------------------------------------
def test_security_local_token_exchange_sets_cookie_and_drops_token(server: Server) -> None:
    if server.mode != "local":
        pytest.skip("local mode only")
    with server.client() as c:
        r = c.get("/runs/abc", params={"token": server.token, "tab": "logs"})
        assert r.status_code == 303
        assert r.headers["location"] == "/runs/abc?tab=logs"
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
        assert c.get("/", params={"token": "nope"}).status_code == 401
        r = c.get("/api/auth/me", headers={"cookie": cookie.split(";")[0]})
        assert r.json() == {"user": "local", "mode": "local"}


def test_security_login_form_page_and_post(server: Server) -> None:
    with server.client() as c:
        page = c.get("/login", params={"next": "/runs"})
        assert page.status_code == 200 and "<form" in page.text and 'value="/runs"' in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        fields = (
            {"token": server.token} if server.mode == "local" else {"username": "alice", "password": PASSWORD}
        )
        bad = {k: "wrong" for k in fields}
        r = c.post("/login", data={**bad, "next": "/runs"}, headers={"origin": server.origin})
        assert r.status_code == 401 and 'role="alert"' in r.text
        r = c.post("/login", data={**fields, "next": "//evil.example/x"}, headers={"origin": server.origin})
        assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
        r = c.post("/login", data=fields, headers={"origin": "http://evil.example"})
        assert r.status_code == 403  # a cross-site login form is refused (login CSRF)


def test_security_logout_invalidates_session(server: Server) -> None:
    cookie = login_cookie(server)
    with server.client() as c:
        assert c.get("/api/auth/me", headers={"cookie": cookie}).status_code == 200
        r = c.post("/api/auth/logout", headers={"cookie": cookie, "origin": server.origin})
        assert r.status_code == 200 and "Max-Age=0" in r.headers["set-cookie"]
        # The same signed cookie no longer works: the session id is gone from the server.
        r = c.get("/api/auth/me", headers={"cookie": cookie})
        assert r.status_code == 401 and r.json()["code"] == "AUTH_REQUIRED"
        assert ws_status(server, "/_event", server.host, {"cookie": cookie}, server.origin) == 403


def test_security_cookie_tampering_refused(server: Server) -> None:
    cookie = login_cookie(server)
    name, value = cookie.split("=", 1)
    # Change the first character: it carries six full bits (a last base64 character may be padding).
    flipped = ("A" if value[0] != "A" else "B") + value[1:]
    from itsdangerous import URLSafeTimedSerializer

    forged = URLSafeTimedSerializer("another-secret", salt="backprop-session").dumps("guess")
    with server.client() as c:
        for bad in (flipped, forged, value.split(".")[0], ""):
            r = c.get("/api/runs", headers={"cookie": f"{name}={bad}"})
            assert r.status_code == 401, bad
        assert c.get("/api/runs", headers={"cookie": cookie}).status_code == 200


def test_security_lifespan_passes_through(server: Server) -> None:
    with server.client() as c:
        r = c.get("/api/test/echo", headers={"cookie": server.cookie + "; theme=dark"})  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    assert r.json()["lifespan_ran"] is True
    assert r.json()["cookie"] == "theme=dark"  # other cookies pass, ours is removed


def test_security_ssh_tunnel_port_and_ipv6_loopback(server: Server) -> None:
    # `ssh -L 9000:localhost:PORT`: the browser sends Host localhost:9000 and a matching Origin.
    cookie = server.cookie  # type: ignore[attr-defined]
    with server.client() as c:
        r = c.post(
            "/api/test/echo",
            headers={"host": "localhost:9000", "origin": "http://localhost:9000", "cookie": cookie},
        )
        assert r.status_code == 200
        r = c.get("/api/runs", headers={"host": "[::1]:9000", "cookie": cookie})
        assert r.status_code == 200
        r = c.post(
            "/api/test/echo",
            headers={"host": "localhost:9000", "origin": "http://localhost:7860", "cookie": cookie},
        )
        assert r.status_code == 403  # another local port is another origin
    assert ws_status(server, "/_event", "localhost:9000", {"cookie": cookie}, "http://localhost:9000") == 101


# --------------------------------------------------------------------------------------------
# Strict limits and expiry: a server with the default limits and three-second sessions
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("guard-strict")
    policy, token = make_policy("basic", free_port(), session_hours=3 / 3600)
    srv = start_server(tmp, policy, token, relaxed=False)
    yield srv
    stop_server(srv)


def test_security_login_brute_force_rate_limited(strict_server: Server) -> None:
    attacker, bystander = "127.0.0.5", "127.0.0.6"
    origin = {"origin": strict_server.origin}
    with strict_server.client(attacker) as c:
        for _ in range(5):
            r = c.post("/api/auth/login", json={"username": "alice", "password": "guess"}, headers=origin)
            assert r.status_code == 401 and r.json()["code"] == "AUTH_INVALID_CREDENTIALS"
        # Even the right password is refused now, through every way of presenting it.
        r = c.post("/api/auth/login", json={"username": "alice", "password": PASSWORD}, headers=origin)
        assert r.status_code == 429 and r.json()["code"] == "AUTH_RATE_LIMITED"
        basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        assert c.get("/api/runs", headers={"authorization": basic}).status_code == 429
        assert (
            c.post("/login", data={"username": "alice", "password": PASSWORD}, headers=origin).status_code
            == 429
        )
        assert c.get("/login").status_code == 200  # the page itself stays reachable
    with strict_server.client(bystander) as c:
        r = c.post("/api/auth/login", json={"username": "alice", "password": PASSWORD}, headers=origin)
        assert r.status_code == 200  # other addresses are not locked out
    log = strict_server.log.read_text()
    assert "failed logins from 127.0.0.5 reached the limit" in log
    assert PASSWORD not in log and "guess" not in log  # attempts are logged by address only


def test_security_session_expires(strict_server: Server) -> None:
    cookie = login_cookie(strict_server, source="127.0.0.7")
    with strict_server.client() as c:
        assert c.get("/api/auth/me", headers={"cookie": cookie}).status_code == 200
        time.sleep(4.2)
        r = c.get("/api/auth/me", headers={"cookie": cookie})
        assert r.status_code == 401 and r.json()["code"] == "AUTH_REQUIRED"


def test_security_server_refuses_without_launcher(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BACKPROPAGATE_UI_LAUNCH"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, __file__, str(free_port())], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "RUNTIME_UI_AUTH_NOT_ENFORCED" in proc.stderr


if __name__ == "__main__":  # pragma: no cover
    serve(int(sys.argv[1]), relaxed="relaxed" in sys.argv[2:])
