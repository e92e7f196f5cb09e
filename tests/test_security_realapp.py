"""The security matrix against the real app that `backprop ui` starts, in local, basic and shared mode.

Every API route of the app's own OpenAPI schema, every page, a static asset, our WebSockets and
Reflex's ``/_event`` socket, crossed with credentials x Host x Origin; then path traversal, uploads,
brute force, cookie tampering and logout, all against the Reflex production server on a real port.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from realapp_helpers import PASSWORD, TUNNEL_HOST, RealApp, fresh_source, start_real_app, ws_open

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DUMMY_ID = "no-such-id-42"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
CREDS = ["none", "bad_header", "good_header", "bad_cookie", "good_cookie"]
HOSTS = ["allowed", "foreign", "ip_literal"]
ORIGINS = ["same", "foreign", "none"]
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
PROBE_BODY = b'"matrix probe"'  # valid JSON that no request body of the API accepts


@pytest.fixture(scope="module", params=["local", "basic", "shared"])
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealApp]:
    """One `backprop ui` per mode; pytest runs a mode's tests together, so one server runs at a time."""
    real = start_real_app(tmp_path_factory.mktemp(f"realapp-{request.param}"), request.param)
    try:
        real.cookie = real.login()
        yield real
    finally:
        assert real.stop() == 0, real.output.read_text(errors="replace")[-2000:]
    if request.param == "shared":  # the launcher stopped the tunnel it started
        with pytest.raises(ProcessLookupError):
            os.kill(int(real.extra["cloudflared_pid"].read_text()), 0)


# --------------------------------------------------------------------------------------------
# What the app exposes: enumerated from the app itself
# --------------------------------------------------------------------------------------------
def page_routes() -> list[str]:
    """The routes ui_app/pages/__init__.py registers (read from its PAGES list, dynamic parts filled)."""
    tree = ast.parse((REPO / "ui_app" / "pages" / "__init__.py").read_text())
    routes = []
    for node in ast.walk(tree):
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and getattr(target, "id", "") == "PAGES":
            routes = [ast.literal_eval(item.elts[0]) for item in node.value.elts]
    assert routes, "PAGES not found in ui_app/pages/__init__.py"
    # "404" names Reflex's not-found page, not a route to request.
    return [re.sub(r"\[\w+\]", DUMMY_ID, r) for r in routes if r.startswith("/")]


def app_answer(method: str, path: str, operation: dict) -> int | None:
    """What the API itself answers the matrix's request, read from the operation's schema.

    The matrix fills path parameters with an unknown id, sends no query and, to anything that
    changes state, a JSON string as the body: so a missing query parameter or any body means
    422, before the handler runs; otherwise an unknown id means 404 and a plain GET 200.
    None: a state-changing operation with neither (none exists; then anything but 5xx).
    """
    params = operation.get("parameters", [])
    if any(p.get("required") and p["in"] == "query" for p in params):
        return 422
    if method in STATE_CHANGING and "requestBody" in operation:
        return 422
    if any(p["in"] == "path" for p in params):
        return 404
    return 200 if method == "GET" else None


def api_operations(app: RealApp) -> list[tuple[str, str, str, int | None]]:
    """Every operation in /api/openapi.json (fetched with good credentials) as a matrix route."""
    with app.client() as c:
        r = c.get("/api/openapi.json", headers={"cookie": app.cookie})
    assert r.status_code == 200, r.text
    ops = []
    for path, item in r.json()["paths"].items():
        for method, operation in item.items():
            if method.upper() in {"GET", "POST", "PUT", "PATCH", "DELETE"}:
                filled = re.sub(r"\{\w+\}", DUMMY_ID, path)
                ops.append((method.upper(), filled, "api", app_answer(method.upper(), path, operation)))
    return ops


def static_asset(app: RealApp) -> str:
    with app.client() as c:
        html = c.get("/", headers={"cookie": app.cookie}).text
    assets = re.findall(r'(?:src|href)="(/assets/[^"]+\.js)"', html)
    assert assets, "the page links its bundle"
    return assets[0]


def expected(method: str, kind: str, creds: str, host: str, origin: str) -> int:
    """The cell's outcome, as tests/test_security_guard.py states it (101 = WebSocket accepted)."""
    ws = method == "WS"
    if host != "allowed":
        return 403 if ws else 421
    if ws or method in STATE_CHANGING:
        if origin == "foreign":
            return 403
        if origin == "none" and (ws or not creds.endswith("_header")):
            return 403
    if creds.startswith("good"):
        return 101 if ws else 0  # 0: the app's own answer
    if ws:
        return 403
    if creds == "bad_header":
        return 401
    return 303 if kind != "api" else 401  # no credentials, or a cookie that proves nothing


def cell_headers(app: RealApp, creds: str) -> dict[str, str]:
    if creds == "good_cookie":
        return {"cookie": app.cookie}
    if creds == "bad_cookie":
        return {"cookie": f"{app.cookie.split('=')[0]}=Zm9v.AAAAAA.tampered"}
    if creds == "good_header":
        return {"authorization": app.good_authorization()}
    if creds == "bad_header":
        return {"authorization": app.bad_authorization()}
    return {}


def host_header(app: RealApp, host: str) -> str:
    return {"allowed": app.host, "foreign": f"evil.example:{app.port}", "ip_literal": "192.168.7.9"}[host]


def origin_value(app: RealApp, host: str, origin: str) -> str | None:
    if origin == "none":
        return None
    if origin == "foreign":
        return "http://evil.example"
    return app.origin if host == "allowed" else f"http://{host_header(app, host)}"


class Clients:
    """Kept-alive connections for the matrix, moved to a fresh source address now and then.

    The guard limits each address (5 failed logins a minute, a request rate): a wrong credential
    gets a new address every 4 tries and everything else every 300 requests, so no cell is
    answered by a limit instead of the check it is about.
    """

    def __init__(self, app: RealApp) -> None:
        self.app = app
        self.pool: dict[bool, tuple[httpx.Client, int] | None] = {True: None, False: None}

    def get(self, creds: str) -> httpx.Client:
        bad = creds == "bad_header"
        client, uses = self.pool[bad] or (None, 0)
        if client is None or uses >= (4 if bad else 300):
            if client is not None:
                client.close()
            client, uses = self.app.client(), 0
        self.pool[bad] = (client, uses + 1)
        return client

    def drop(self, creds: str) -> None:
        """Forget the connection ``creds`` used (the server closed it)."""
        entry = self.pool[creds == "bad_header"]
        if entry:
            entry[0].close()
            self.pool[creds == "bad_header"] = None

    def send(self, creds: str, method: str, path: str, **kwargs: object) -> httpx.Response:
        """One request; if the server had closed the kept-alive connection, once more on a new one."""
        try:
            return self.get(creds).request(method, path, **kwargs)
        except httpx.RemoteProtocolError:  # "disconnected without sending a response": a stale connection
            self.drop(creds)
            return self.get(creds).request(method, path, **kwargs)

    def close(self) -> None:
        for entry in self.pool.values():
            if entry:
                entry[0].close()


def check_http_cell(
    app: RealApp, clients: Clients, route: tuple[str, str, str, int | None], cell: tuple[str, str, str]
) -> str | None:
    """None when the cell behaves as expected, else a line saying what went wrong."""
    method, path, kind, app_want = route
    creds, host, origin = cell
    headers = {**cell_headers(app, creds), "host": host_header(app, host)}
    if value := origin_value(app, host, origin):
        headers["origin"] = value
    want = expected(method, kind, creds, host, origin)
    if method in STATE_CHANGING:
        headers["content-type"] = "application/json"
    probe = PROBE_BODY if method in STATE_CHANGING else None
    r = clients.send(creds, method, path, headers=headers, content=probe)
    where = f"{method} {path} {creds}/{host}/{origin}"
    if want == 0 and kind == "page" and r.status_code == 307:
        # The exported pages are folders: the static server adds the slash, then serves the page.
        if r.headers["location"].split(app.host, 1)[-1] != path + "/":
            return f"{where}: redirected to {r.headers['location']}"
        r = clients.send(creds, "GET", path + "/", headers=headers)
    if r.headers.get("x-frame-options") != "DENY":
        return f"{where}: no security headers"
    body_code = None
    if r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        body_code = body.get("code") if isinstance(body, dict) else None
    if want == 0:  # passed the guard: the app answered, not the guard
        wrong = r.status_code >= 500 if app_want is None else r.status_code != app_want
        if wrong or str(body_code or "").startswith("AUTH_") or r.status_code in (303, 401, 421, 429):
            return f"{where}: got {r.status_code} {r.text[:120]!r}, want the app's {app_want}"
        if kind == "page" and "<html" not in r.text.lower():
            return f"{where}: no page"
        if kind == "poll" and "Invalid transport" not in r.text:
            return f"{where}: the socket server answered {r.text[:120]!r}"
        return None
    if r.status_code != want:
        return f"{where}: got {r.status_code} {r.text[:120]!r}, want {want}"
    want_code = {421: "AUTH_HOST_FORBIDDEN", 403: "AUTH_ORIGIN_FORBIDDEN"}.get(want)
    if want == 401:
        want_code = "AUTH_INVALID_CREDENTIALS" if creds == "bad_header" else "AUTH_REQUIRED"
    if want_code and body_code != want_code:
        return f"{where}: code {body_code}, want {want_code}"
    if want == 303 and not r.headers["location"].startswith("/login?next="):
        return f"{where}: redirected to {r.headers['location']}"
    return None


def check_ws_cell(app: RealApp, path: str, cell: tuple[str, str, str]) -> str | None:
    creds, host, origin = cell
    want = expected("WS", "ws", creds, host, origin)
    read_first = not path.startswith("/api/events")  # that one stays quiet until a run changes
    got, first = ws_open(
        app,
        path,
        host_header(app, host),
        cell_headers(app, creds),
        origin_value(app, host, origin),
        read_first,
    )
    where = f"WS {path} {creds}/{host}/{origin}"
    if got != want:
        return f"{where}: got {got}, want {want}"
    if (
        got == 101
        and path.startswith("/_event")
        and not (first and first.startswith("0") and '"sid"' in first)
    ):
        return f"{where}: no engine.io opening packet, got {first!r}"
    if got == 101 and path.startswith("/api/runs/") and not (first and "STATE_RUN_NOT_FOUND" in first):
        return f"{where}: the run socket said {first!r}"
    return None


CELLS = list(itertools.product(CREDS, HOSTS, ORIGINS))


def test_realapp_matrix_every_route(app: RealApp) -> None:
    """All API operations, pages, an asset and three sockets x 45 credential/Host/Origin cells."""
    ops = api_operations(app)
    assert ("GET", "/api/runs", "api", 200) in ops and ("POST", "/api/runs", "api", 422) in ops
    assert ("DELETE", f"/api/runs/{DUMMY_ID}", "api", 404) in ops
    pages = [("GET", p, "page", 200) for p in page_routes()]
    assert ("GET", "/", "page", 200) in pages and ("GET", f"/runs/{DUMMY_ID}", "page", 200) in pages
    # Reflex's socket path also takes plain HTTP (engine.io polling): the same guard must cover it.
    # Reflex's socket server speaks WebSocket only: past the guard it answers "Invalid transport".
    poll = ("GET", "/_event/?EIO=4&transport=polling", "poll", 400)
    http = [*ops, *pages, ("GET", static_asset(app), "asset", 200), poll]
    sockets = [f"/api/runs/{DUMMY_ID}/events", "/api/events", "/_event/?EIO=4&transport=websocket"]
    failures = []
    clients = Clients(app)
    try:
        for route, cell in itertools.product(http, CELLS):
            failures.append(check_http_cell(app, clients, route, cell))
    finally:
        clients.close()
    for path, cell in itertools.product(sockets, CELLS):
        failures.append(check_ws_cell(app, path, cell))
    failures = [f for f in failures if f]
    total = (len(http) + len(sockets)) * len(CELLS)
    print(f"\n{app.mode}: {len(http)} HTTP routes + {len(sockets)} sockets, {total} cells")
    assert not failures, f"{len(failures)} of {total} cells wrong:\n" + "\n".join(failures[:40])
    # Nothing the matrix sent with a dummy id or a bad body created anything.
    with app.client() as c:
        assert c.get("/api/runs", headers={"cookie": app.cookie}).json() == []


# --------------------------------------------------------------------------------------------
# Mode specifics: where credentials come from, which hosts are allowed
# --------------------------------------------------------------------------------------------
def test_realapp_mode_credentials_and_hosts(app: RealApp) -> None:
    lock = app.home / "ui.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    launch = lock.read_text()
    with app.client() as c:
        if app.mode == "local":
            assert app.url.startswith(f"http://127.0.0.1:{app.port}/?token=") and app.token
            # The lock file holds the token's digest only, never the token.
            assert app.token not in launch and hashlib.sha256(app.token.encode()).hexdigest() in launch
            r = c.get(f"/runs/{DUMMY_ID}", params={"token": app.token, "tab": "logs"})
            assert r.status_code == 303 and r.headers["location"] == f"/runs/{DUMMY_ID}?tab=logs"
            cookie = r.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
            assert c.get("/", params={"token": "nope"}).status_code == 401
        else:
            assert "token=" not in app.url and PASSWORD not in launch
            shared_line = f"Shared at: https://{TUNNEL_HOST}/"
            assert (shared_line in app.output.read_text()) == (app.mode == "shared")
            r = c.post(
                "/api/auth/login",
                json={"username": "alice", "password": PASSWORD},
                headers={"origin": app.origin},
            )
            assert r.status_code == 200 and "HttpOnly" in r.headers["set-cookie"]
            assert ("Secure" in r.headers["set-cookie"]) == (app.mode == "shared")
        me = c.get("/api/auth/me", headers={"cookie": app.cookie}).json()
        assert me == {"user": "local" if app.mode == "local" else "alice", "mode": app.mode}
        # The run service is up in the app's process (its lifespan ran under Reflex).
        r = c.get("/api/runs", headers={"cookie": app.cookie})
        assert r.status_code == 200 and r.json() == []
        # Loopback names with any port (an SSH tunnel) are allowed in every mode.
        for host in (f"localhost:{app.port}", "localhost:9000", f"127.0.0.1:{app.port}", "[::1]:9000"):
            assert c.get("/api/runs", headers={"host": host, "cookie": app.cookie}).status_code == 200, host
        tunnel = c.get("/api/runs", headers={"host": TUNNEL_HOST, "cookie": app.cookie})
        assert tunnel.status_code == (200 if app.mode == "shared" else 421)
        # A tunnel host that merely ends like ours is someone else's.
        r = c.get("/api/runs", headers={"host": "x" + TUNNEL_HOST, "cookie": app.cookie})
        assert r.status_code == 421


# --------------------------------------------------------------------------------------------
# Paths, uploads
# --------------------------------------------------------------------------------------------
def _error(r, status: int, code: str) -> None:  # noqa: ANN001 - an httpx.Response
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text
    assert "root:" not in r.text  # no file content ever leaks into an answer


def test_realapp_path_traversal_in_every_path_taking_route(app: RealApp, tmp_path: Path) -> None:
    data_dir = app.home / "datasets"
    data_dir.mkdir(parents=True, exist_ok=True)
    good_data = data_dir / "train.jsonl"
    good_data.write_text('{"text": "hello"}\n')
    # Symlinks inside the allowed folders that lead out of them.
    (data_dir / "escape.jsonl").symlink_to("/etc/passwd")
    (data_dir / "escape-dir").symlink_to("/etc", target_is_directory=True)
    (app.home / "models").mkdir(exist_ok=True)
    (app.home / "models" / "escape-model").symlink_to("/etc", target_is_directory=True)
    (tmp_path / "to-etc").symlink_to("/etc", target_is_directory=True)
    headers = {"cookie": app.cookie, "origin": app.origin}
    data_attacks = [
        "../../etc/passwd",
        "../../../../../../../../etc/passwd",
        "/etc/passwd",
        str(data_dir / ".." / ".." / ".." / ".." / ".." / ".." / "etc" / "passwd"),
        str(data_dir / "escape.jsonl"),
        str(data_dir / "escape-dir" / "passwd"),
    ]
    model_attacks = ["/etc", "../../../../../../etc", str(app.home / "models" / "escape-model")]
    output_attacks = ["/etc/backprop", "../../../../../../../../etc/backprop", str(tmp_path / "to-etc" / "x")]
    with app.client() as c:
        for bad in data_attacks:
            _error(c.post("/api/runs", json={"data": bad}, headers=headers), 403, "INPUT_PATH_TRAVERSAL")
            r = c.post("/api/runs", json={"data": str(good_data), "eval_data": bad}, headers=headers)
            _error(r, 403, "INPUT_PATH_TRAVERSAL")
        for bad in model_attacks:
            r = c.post("/api/runs", json={"data": str(good_data), "model": bad}, headers=headers)
            _error(r, 403, "INPUT_PATH_TRAVERSAL")
            r = c.get("/api/datasets/anything/validate", params={"model": bad}, headers=headers)
            assert r.status_code in (403, 404) and "root:" not in r.text
            r = c.post("/api/models", json={"id": bad}, headers=headers)
            assert r.status_code in (403, 422) or r.json()["kind"] == "hub", r.text  # a name, never read
        for bad in output_attacks:
            r = c.post("/api/runs", json={"data": str(good_data), "output_dir": bad}, headers=headers)
            _error(r, 403, "UI_OUTPUT_DIR_FORBIDDEN")
        # Data set ids are looked up, never joined onto a path.
        for bad in ("..%2F..%2Fetc%2Fpasswd", "..", "%2Fetc%2Fpasswd", "....//....//etc//passwd"):
            for route in (f"/api/datasets/{bad}/preview", f"/api/datasets/{bad}/validate"):
                r = c.get(route, headers=headers)
                assert r.status_code in (404, 422), (route, r.status_code, r.text)
                assert "root:" not in r.text
        for bad in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd"):
            r = c.get(f"/api/runs/{bad}/log", headers=headers)
            assert r.status_code == 404 and "root:" not in r.text
        assert c.get("/api/runs", headers={"cookie": app.cookie}).json() == []
    runs_dir = app.home / "runs"
    assert not runs_dir.exists() or not list(runs_dir.iterdir())  # no run folder was made


def test_realapp_uploads_oversize_and_wrong_type(app: RealApp) -> None:
    datasets = app.home / "datasets"
    before = set(datasets.iterdir()) if datasets.exists() else set()
    headers = {"cookie": app.cookie, "origin": app.origin}
    limit_mb = 1  # BACKPROPAGATE_SERVER__MAX_UPLOAD_MB for the launched app
    with app.client() as c:
        for name, content in (("x.exe", b"MZ"), ("../../evil.sh", b"#!/bin/sh\n"), ("a.jsonl.php", b"<?php")):
            _error(
                c.post("/api/datasets", files={"file": (name, content)}, headers=headers),
                415,
                "INPUT_UPLOAD_TYPE",
            )
        big = b'{"text": "' + b"a" * (limit_mb * 1024 * 1024 + 10) + b'"}\n'
        r = c.post("/api/datasets", files={"file": ("big.jsonl", big)}, headers=headers)
        _error(r, 413, "INPUT_UPLOAD_TOO_LARGE")
        r = c.post("/api/datasets", json={"file": "not a form"}, headers=headers)
        assert r.status_code == 422 and r.json()["code"].startswith("INPUT_"), r.text
        # Without credentials or from another site nothing is read at all.
        assert (
            c.post(
                "/api/datasets", files={"file": ("a.jsonl", b"{}")}, headers={"origin": app.origin}
            ).status_code
            == 401
        )
        r = c.post(
            "/api/datasets",
            files={"file": ("a.jsonl", b"{}")},
            headers={"cookie": app.cookie, "origin": "http://evil.example"},
        )
        assert r.status_code == 403
        assert (set(datasets.iterdir()) if datasets.exists() else set()) == before
        rows = "".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(3))
        r = c.post("/api/datasets", files={"file": ("../../my data.jsonl", rows.encode())}, headers=headers)
        assert r.status_code == 201, r.text
        up = r.json()
        assert up["original_name"] == "my data.jsonl"
        assert set(datasets.iterdir()) - before == {datasets / f"{up['id']}.jsonl"}  # our name, our folder
        r = c.get(f"/api/datasets/{up['id']}/preview", headers={"cookie": app.cookie})
        assert r.status_code == 200 and r.json()["rows"][0] == {"instruction": "q0", "output": "a0"}
    assert not list(app.home.parent.rglob("evil.sh")) and not list(app.home.parent.rglob("my data.jsonl"))


# --------------------------------------------------------------------------------------------
# Brute force, cookie tampering, logout
# --------------------------------------------------------------------------------------------
def test_realapp_login_brute_force_rate_limited(app: RealApp) -> None:
    attacker, bystander = fresh_source(), fresh_source()
    tunnel_headers: dict[str, str] = {}
    if app.mode == "shared":
        # Behind the tunnel every request comes from cloudflared on loopback; Cloudflare names the visitor.
        attacker, bystander = "127.0.0.1", "127.0.0.1"
        tunnel_headers = {"cf-connecting-ip": "203.0.113.7"}
    with app.client(attacker) as c:
        for _ in range(5):
            if app.mode == "local":
                r = c.get("/api/runs", headers={"authorization": app.bad_authorization()})
            else:
                r = c.post(
                    "/api/auth/login",
                    json={"username": "alice", "password": "guess"},
                    headers={"origin": app.origin, **tunnel_headers},
                )
            assert r.status_code == 401 and r.json()["code"] == "AUTH_INVALID_CREDENTIALS", r.text
        # Even the right credentials are refused now, however they are presented.
        r = c.get("/api/runs", headers={"authorization": app.good_authorization(), **tunnel_headers})
        assert r.status_code == 429 and r.json()["code"] == "AUTH_RATE_LIMITED"
        if app.mode == "local":
            assert c.get("/", params={"token": app.token}).status_code == 429
        else:
            r = c.post(
                "/api/auth/login",
                json={"username": "alice", "password": PASSWORD},
                headers={"origin": app.origin, **tunnel_headers},
            )
            assert r.status_code == 429
        assert c.get("/login", headers=tunnel_headers).status_code == 200  # the page stays reachable
    other = {"cf-connecting-ip": "198.51.100.9"} if app.mode == "shared" else {}
    with app.client(bystander) as c:  # another visitor is not locked out
        r = c.get("/api/runs", headers={"authorization": app.good_authorization(), **other})
        assert r.status_code == 200
    blocked = "203.0.113.7" if app.mode == "shared" else attacker
    deadline = time.monotonic() + 10
    while f"failed logins from {blocked} reached the limit" not in app.server_log.read_text():
        assert time.monotonic() < deadline, app.server_log.read_text()[-2000:]
        time.sleep(0.2)
    log = app.server_log.read_text()
    assert PASSWORD not in log and "guess" not in log and (app.token or PASSWORD) not in log


def test_realapp_cookie_tampering_refused(app: RealApp) -> None:
    cookie = app.login()
    name, value = cookie.split("=", 1)
    flipped = ("A" if value[0] != "A" else "B") + value[1:]
    from itsdangerous import URLSafeTimedSerializer

    forged = URLSafeTimedSerializer("another-secret", salt="backprop-session").dumps("guess")
    with app.client() as c:
        for bad in (flipped, forged, value.split(".")[0], value + "x", ""):
            r = c.get("/api/runs", headers={"cookie": f"{name}={bad}"})
            assert r.status_code == 401 and r.json()["code"] == "AUTH_REQUIRED", bad
            r = c.get("/", headers={"cookie": f"{name}={bad}"})
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), bad
            status, _ = ws_open(
                app,
                "/_event/?EIO=4&transport=websocket",
                app.host,
                {"cookie": f"{name}={bad}"},
                app.origin,
                False,
            )
            assert status == 403, bad
        assert c.get("/api/runs", headers={"cookie": cookie}).status_code == 200


def test_realapp_logout_invalidates_session(app: RealApp) -> None:
    cookie = app.login()
    socket_path = "/_event/?EIO=4&transport=websocket"
    with app.client() as c:
        assert c.get("/api/auth/me", headers={"cookie": cookie}).status_code == 200
        assert ws_open(app, socket_path, app.host, {"cookie": cookie}, app.origin, True)[0] == 101
        # Logging out from another site is refused (no logout CSRF).
        r = c.post("/api/auth/logout", headers={"cookie": cookie, "origin": "http://evil.example"})
        assert r.status_code == 403
        r = c.post("/api/auth/logout", headers={"cookie": cookie, "origin": app.origin})
        assert r.status_code == 200 and "Max-Age=0" in r.headers["set-cookie"]
        r = c.get("/api/auth/me", headers={"cookie": cookie})
        assert r.status_code == 401 and r.json()["code"] == "AUTH_REQUIRED"
        assert c.get("/", headers={"cookie": cookie}).status_code == 303
        assert ws_open(app, socket_path, app.host, {"cookie": cookie}, app.origin, False)[0] == 403
        assert (
            c.get("/api/auth/me", headers={"cookie": app.cookie}).status_code == 200
        )  # other sessions live on


# --------------------------------------------------------------------------------------------
# The pages reach the run service through the guard (a browser, the real socket)
# --------------------------------------------------------------------------------------------
def test_realapp_runs_page_reaches_the_run_service(app: RealApp) -> None:
    """Signed in, the Runs page lists runs from the server's RunService instead of an error."""
    if app.mode == "shared":
        # Its cookie is Secure (the tunnel is https), which a browser keeps only over https.
        pytest.skip(
            "the shared mode's Secure cookie needs the tunnel's https; local and basic cover the page"
        )
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            if app.mode == "local":
                page.goto(app.url)  # the printed URL: its token becomes a session cookie
            else:
                page.goto(f"{app.base}/login")
                page.fill("#username", "alice")
                page.fill("#password", PASSWORD)
                page.click("button[type=submit]")
            page.wait_for_selector("#no-runs", timeout=30_000)
            body = page.inner_text("body")
            assert "token=" not in page.url
        finally:
            browser.close()
    assert "RUNTIME_INTERNAL" not in body and "not available in this process" not in body, body


def test_realapp_export_download_takes_names_not_paths(app: RealApp) -> None:
    """An export's files are fetched by name: paths, dot ids and symlinks out of its folder are refused."""
    from backpropagate.export.job import JOB_FILE

    job_dir = app.home / "runs" / "run-dl" / "exports" / "exp-dl"
    job_dir.mkdir(parents=True)
    (job_dir / JOB_FILE).write_text(json.dumps({"id": "exp-dl", "run_id": "run-dl", "status": "completed"}))
    (job_dir / "model.gguf").write_bytes(b"GGUF-bytes")
    (job_dir / "escape.gguf").symlink_to("/etc/passwd")
    headers = {"cookie": app.cookie}
    route = "/api/exports/exp-dl/download"
    with app.client() as c:
        r = c.get(route, params={"file": "model.gguf"}, headers=headers)
        assert r.status_code == 200 and r.content == b"GGUF-bytes"
        for bad in ("../../../../../../etc/passwd", "/etc/passwd", "..", "escape.gguf", "sub/../model.gguf"):
            _error(c.get(route, params={"file": bad}, headers=headers), 403, "INPUT_PATH_TRAVERSAL")
        for bad_id in ("%2E%2E", "..%2F..%2F..", ".hidden"):
            r = c.get(f"/api/exports/{bad_id}/download", params={"file": "passwd"}, headers=headers)
            assert r.status_code == 404 and "root:" not in r.text, (bad_id, r.text)
        # Without a session the file is not served at all.
        assert c.get(route, params={"file": "model.gguf"}).status_code == 401
