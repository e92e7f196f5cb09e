"""Edge cases of the guard, in process (HTTP only): odd headers, exempt paths, malformed logins."""

from __future__ import annotations

import base64

import httpx
import pytest
from fastapi import FastAPI

from backpropagate.server.security import build_guard
from backpropagate.server.security.policy import resolve_policy


@pytest.fixture(scope="module")
def guard():
    app = FastAPI()

    @app.get("/api/thing")
    async def thing() -> dict:
        return {"ok": True}

    @app.get("/ping")
    async def ping() -> dict:
        return {"pong": True}

    policy = resolve_policy(
        host="127.0.0.1",
        port=7860,
        auth="alice:edge-password",
        auth_file=None,
        users_file=None,
        share=False,
        env={},
    )
    return build_guard(app, policy, login_failures_per_minute=1000)


async def request(guard, method: str, path: str, **kw) -> httpx.Response:
    transport = httpx.ASGITransport(app=guard, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost:7860") as client:
        return await client.request(method, path, **kw)


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "authorization",
    [
        "Digest abc",
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Bearer anything",
        "",
    ],
)
async def test_security_malformed_authorization_refused(guard, authorization: str) -> None:
    r = await request(guard, "GET", "/api/thing", headers={"authorization": authorization})
    assert r.status_code == 401 and r.json()["code"] == "AUTH_INVALID_CREDENTIALS"


@pytest.mark.anyio
async def test_security_basic_auth_and_unknown_user(guard) -> None:
    assert (
        await request(guard, "GET", "/api/thing", headers=basic("alice", "edge-password"))
    ).status_code == 200
    assert (
        await request(guard, "GET", "/api/thing", headers=basic("mallory", "edge-password"))
    ).status_code == 401


@pytest.mark.anyio
async def test_security_exempt_paths_and_missing_host(guard) -> None:
    assert (await request(guard, "GET", "/ping")).json() == {"pong": True}
    r = await request(guard, "GET", "/ping", headers={"host": ""})
    assert r.status_code == 421 and r.json()["code"] == "AUTH_HOST_FORBIDDEN"
    r = await request(guard, "GET", "/ping", headers={"host": "localhost.evil.example"})
    assert r.status_code == 421


@pytest.mark.anyio
async def test_security_json_login_malformed_and_me(guard) -> None:
    origin = {"origin": "http://localhost:7860"}
    r = await request(guard, "POST", "/api/auth/login", content=b"[1, 2]", headers=origin)
    assert r.status_code == 422 and r.json()["code"] == "INPUT_REQUEST_INVALID"
    r = await request(guard, "POST", "/api/auth/login", content=b"x" * 100_000, headers=origin)
    assert r.status_code == 422
    r = await request(
        guard,
        "POST",
        "/api/auth/login",
        json={"username": "alice", "password": "edge-password"},
        headers=origin,
    )
    assert r.status_code == 200 and r.json() == {"user": "alice", "mode": "basic"}
    cookie = r.headers["set-cookie"].split(";")[0]
    assert "edge-password" not in r.text
    me = await request(guard, "GET", "/api/auth/me", headers={"cookie": cookie})
    assert me.json() == {"user": "alice", "mode": "basic"}
    assert me.headers["cache-control"] == "no-store"


@pytest.mark.anyio
async def test_security_unauthenticated_post_to_page_is_401_not_redirect(guard) -> None:
    r = await request(guard, "POST", "/some/form", headers={"origin": "http://localhost:7860"})
    assert r.status_code == 401 and r.json()["code"] == "AUTH_REQUIRED"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def shared_guard():
    app = FastAPI()

    @app.get("/api/thing")
    async def thing() -> dict:
        return {"ok": True}

    policy = resolve_policy(
        host="127.0.0.1",
        port=7860,
        auth="alice:edge-password",
        auth_file=None,
        users_file=None,
        share=True,
        share_host="abc.trycloudflare.com",
        env={},
    )
    return build_guard(app, policy, login_failures_per_minute=2)


TUNNEL = {
    "host": "abc.trycloudflare.com",
    "origin": "https://abc.trycloudflare.com",
    "x-forwarded-proto": "https",
}


@pytest.mark.anyio
async def test_security_shared_mode_through_tunnel(shared_guard) -> None:
    login = {"username": "alice", "password": "edge-password"}
    r = await request(shared_guard, "POST", "/api/auth/login", json=login, headers=TUNNEL)
    assert r.status_code == 200
    assert "Secure" in r.headers["set-cookie"]
    cookie = r.headers["set-cookie"].split(";")[0]
    r = await request(shared_guard, "GET", "/api/thing", headers={**TUNNEL, "cookie": cookie})
    assert r.status_code == 200
    other = {**TUNNEL, "host": "other.trycloudflare.com", "cookie": cookie}
    assert (await request(shared_guard, "GET", "/api/thing", headers=other)).status_code == 421


@pytest.mark.anyio
async def test_security_shared_mode_limits_each_tunnel_client(shared_guard) -> None:
    wrong = {"username": "alice", "password": "guess"}
    right = {"username": "alice", "password": "edge-password"}
    attacker = {**TUNNEL, "cf-connecting-ip": "203.0.113.5"}
    for _ in range(2):
        r = await request(shared_guard, "POST", "/api/auth/login", json=wrong, headers=attacker)
        assert r.status_code == 401
    r = await request(shared_guard, "POST", "/api/auth/login", json=right, headers=attacker)
    assert r.status_code == 429
    # Another visitor of the same tunnel (same loopback peer) is not locked out.
    visitor = {**TUNNEL, "cf-connecting-ip": "198.51.100.7"}
    assert (
        await request(shared_guard, "POST", "/api/auth/login", json=right, headers=visitor)
    ).status_code == 200


@pytest.mark.anyio
async def test_security_token_exchange_never_redirects_off_site() -> None:
    from backpropagate.server.security.policy import new_token

    app = FastAPI()
    policy = resolve_policy(
        host="127.0.0.1", port=7860, auth=None, auth_file=None, users_file=None, share=False, env={}
    )
    token = new_token()
    from backpropagate.server.security.policy import hash_token

    guard = build_guard(app, policy.model_copy(update={"local_token_hash": hash_token(token)}))
    # Raw ASGI: an HTTP client would read "//evil.example/x" as another host, a browser may send it as a path.
    scope = {
        "type": "http",
        "method": "GET",
        "path": "//evil.example/x",
        "query_string": f"token={token}".encode(),
        "headers": [(b"host", b"localhost:7860")],
        "client": ("127.0.0.1", 5000),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await guard(scope, receive, send)
    start = sent[0]
    assert start["status"] == 303
    assert dict(start["headers"])[b"location"] == b"/evil.example/x"


@pytest.mark.anyio
async def test_security_allowed_host_with_port() -> None:
    app = FastAPI()

    @app.get("/api/thing")
    async def thing() -> dict:
        return {"ok": True}

    policy = resolve_policy(
        host="127.0.0.1",
        port=7860,
        auth="alice:edge-password",
        auth_file=None,
        users_file=None,
        share=False,
        env={"BACKPROPAGATE_UI_ALLOWED_HOSTS": "gpu-box.lan:7860, [fd00::1]"},
    )
    guard = build_guard(app, policy)
    creds = basic("alice", "edge-password")
    for host in ("gpu-box.lan", "gpu-box.lan:8443", "[fd00::1]:7860"):
        assert (await request(guard, "GET", "/api/thing", headers={**creds, "host": host})).status_code == 200
    assert (
        await request(guard, "GET", "/api/thing", headers={**creds, "host": "[fd00::2]"})
    ).status_code == 421
