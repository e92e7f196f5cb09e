"""Parallel login guesses against a real server: each attempt is counted before its hash runs."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
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
