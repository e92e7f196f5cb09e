"""Parallel login guesses against a real server: each attempt is counted before its hash runs."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from realapp_helpers import PASSWORD
from test_security_guard import Server, free_port, make_policy, start_server, stop_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    policy, token = make_policy("basic", free_port())
    srv = start_server(Path(tmp_path_factory.mktemp("hardening")), policy, token, relaxed=False)
    yield srv
    stop_server(srv)


def _parallel(server: Server, send, source: str, n: int = 60) -> list[int]:
    def one(_: int) -> int:
        with server.client(source) as c:
            return send(c).status_code

    with ThreadPoolExecutor(max_workers=30) as pool:
        return list(pool.map(one, range(n)))


def test_hardening_parallel_wrong_logins_hit_the_limit(server: Server) -> None:
    codes = _parallel(
        server,
        lambda c: c.post(
            "/api/auth/login",
            json={"username": "alice", "password": "wrong-guess"},
            headers={"origin": server.origin},
        ),
        "127.0.0.21",
    )
    assert set(codes) <= {401, 429}, codes
    assert codes.count(401) <= 5, codes  # the limit is 5 failures a minute per address


def test_hardening_parallel_wrong_basic_auth_hit_the_limit(server: Server) -> None:
    bad = "Basic " + base64.b64encode(b"alice:another-guess").decode()
    codes = _parallel(server, lambda c: c.get("/api/runs", headers={"authorization": bad}), "127.0.0.22")
    assert set(codes) <= {401, 429}, codes
    assert codes.count(401) <= 5, codes


def test_hardening_non_latin1_next_is_no_500(server: Server) -> None:
    with server.client("127.0.0.23") as c:
        r = c.get("/login", params={"next": "/runs/\u0442\u0435\u0441\u0442\u2603"})
        assert r.status_code == 200
        r = c.post(
            "/login",
            data={"username": "alice", "password": PASSWORD, "next": "/runs/\u2603"},
            headers={"origin": server.origin},
        )
        assert r.status_code == 303
        assert r.headers["location"] == "/runs/%E2%98%83"


def test_hardening_csp_connects_only_to_self(server: Server) -> None:
    with server.client("127.0.0.24") as c:
        csp = c.get("/login").headers["content-security-policy"]
    assert "connect-src 'self';" in csp
    assert "ws:" not in csp
