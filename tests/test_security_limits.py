"""The guard's newer parts in process: request limits, account backoff, trusted proxies from
Settings, and the socket-owner check on real loopback sockets."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.server.security import build_guard
from backpropagate.server.security.peers import is_same_user, socket_owner
from backpropagate.server.security.policy import resolve_policy
from backpropagate.server.security.ratelimit import AccountBackoff, parse_proxies
from backpropagate.settings import get_settings

PASSWORD = "limits-password"


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def _guard() -> object:
    app = FastAPI()

    @app.post("/api/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    policy = resolve_policy(
        host="127.0.0.1",
        port=7860,
        auth=f"alice:{PASSWORD}",
        auth_file=None,
        users_file=None,
        share=False,
        env={},
    )
    return build_guard(app, policy)


def _client(guard: object, peer: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=guard, client=(peer, 40000))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://localhost:7860")


@pytest.mark.anyio
async def test_security_body_cap_comes_from_settings(settings_env: pytest.MonkeyPatch) -> None:
    settings_env.setenv("BACKPROPAGATE_SERVER__MAX_REQUEST_KB", "4")
    guard = _guard()
    headers = {"origin": "http://localhost:7860"}
    async with _client(guard, "127.0.0.1") as c:
        ok = await c.post("/api/echo", content=b"x" * 4000, auth=("alice", PASSWORD), headers=headers)
        assert ok.status_code == 200 and ok.json() == {"bytes": 4000}
        big = await c.post("/api/echo", content=b"x" * 5000, auth=("alice", PASSWORD), headers=headers)
        assert big.status_code == 413 and big.json()["code"] == "INPUT_REQUEST_TOO_LARGE"
        # Refused before credentials are even looked at: no body reaches the app or the login.
        anon = await c.post("/api/echo", content=b"x" * 5000, headers=headers)
        assert anon.status_code == 413
        bad = await c.post(
            "/api/echo", content=b"{}", auth=("alice", PASSWORD), headers={**headers, "content-length": "x"}
        )
        assert bad.status_code in (400, 422) and bad.json()["code"] == "INPUT_REQUEST_INVALID"


@pytest.mark.anyio
async def test_security_trusted_proxies_come_from_settings(settings_env: pytest.MonkeyPatch) -> None:
    async def codes_with_a_new_forwarded_client_each_time(guard: object) -> list[int]:
        """Failed logins from one proxy, each naming another client, until a 429 (at most 8)."""
        codes: list[int] = []
        async with _client(guard, "10.1.2.3") as c:
            while len(codes) < 8 and 429 not in codes:
                r = await c.post(
                    "/api/auth/login",
                    json={"username": f"u{len(codes)}", "password": "x"},
                    headers={"origin": "http://localhost:7860", "x-forwarded-for": f"203.0.113.{len(codes)}"},
                )
                codes.append(r.status_code)
        return codes

    untrusted = await codes_with_a_new_forwarded_client_each_time(_guard())
    assert untrusted[-1] == 429, untrusted  # the header is ignored: one address, one budget
    settings_env.setenv("BACKPROPAGATE_SERVER__TRUSTED_PROXIES", "10.1.0.0/16")
    get_settings.cache_clear()
    trusted = await codes_with_a_new_forwarded_client_each_time(_guard())
    assert trusted == [401] * 8, trusted  # each forwarded client has its own


def test_security_bad_trusted_proxy_is_a_start_up_error(settings_env: pytest.MonkeyPatch) -> None:
    settings_env.setenv("BACKPROPAGATE_SERVER__TRUSTED_PROXIES", "10.0.0.1, gateway.local")
    with pytest.raises(BackpropError) as err:
        _guard()
    assert err.value.code == ErrorCode.CONFIG_INVALID_SETTING and "gateway.local" in err.value.message
    assert [str(n) for n in parse_proxies(" 10.0.0.1 ,::1,192.168.0.0/16")] == [
        "10.0.0.1/32",
        "::1/128",
        "192.168.0.0/16",
    ]


def test_security_account_backoff_grows_and_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("backpropagate.server.security.ratelimit.time.monotonic", lambda: now[0])
    backoff = AccountBackoff(free=3, max_delay=8.0)
    assert [backoff.reserve("alice") for _ in range(3)] == [True, True, True]
    assert backoff.wait("alice") == pytest.approx(1.0)  # the third failure starts the wait
    assert not backoff.reserve("alice")
    waits = []
    for _ in range(5):
        now[0] += backoff.wait("alice")
        assert backoff.reserve("alice")
        waits.append(backoff.wait("alice"))
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0]  # doubling, capped
    assert backoff.wait("bob") == 0 and backoff.reserve("bob")  # accounts are apart
    backoff.failed("alice", "old password")
    assert backoff.known_wrong("alice", "old password")
    assert not backoff.known_wrong("bob", "old password") and not backoff.known_wrong("alice", "other")
    backoff.succeeded("alice")
    assert backoff.wait("alice") == 0 and backoff.reserve("alice")
    assert not backoff.known_wrong("alice", "old password")  # forgotten once the owner signed in


def test_security_socket_owner_of_a_real_loopback_connection() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            conn, peer = server.accept()
            with conn:
                scope = {"client": peer, "server": server.getsockname(), "headers": []}
                if socket_owner(scope) is None:
                    pytest.skip("no kernel socket table here (/proc/net/tcp)")
                assert socket_owner(scope) == os.getuid()
                assert is_same_user(scope)
                # A forwarded client is never "this user", whoever runs the proxy.
                assert not is_same_user({**scope, "headers": [(b"x-forwarded-for", b"192.0.2.1")]})
                # A port no connection uses, or a client on another machine: unknown.
                assert socket_owner({**scope, "client": ("127.0.0.1", 1)}) is None
                assert socket_owner({**scope, "client": ("192.0.2.1", peer[1])}) is None
            assert client.fileno() >= 0
