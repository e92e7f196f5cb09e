"""The guard's small parts: Host and Origin parsing, redirect targets, token buckets, cookies."""

from __future__ import annotations

import time

import pytest

from backpropagate.server.security.hosts import split_host
from backpropagate.server.security.login import render_login, safe_next
from backpropagate.server.security.origin import origin_key, same_origin
from backpropagate.server.security.ratelimit import TokenBuckets
from backpropagate.server.security.sessions import drop_cookie, read_cookie


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("localhost:7860", ("localhost", 7860)),
        ("LOCALHOST", ("localhost", None)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::1]", ("::1", None)),
        ("example.org.", ("example.org", None)),
        ("::1", None),
        ("host:99999", None),
        ("host:abc", None),
        ("evil.com@localhost", None),
        ("", None),
    ],
)
def test_security_split_host(value: str, want: tuple[str, int | None] | None) -> None:
    assert split_host(value) == want


def test_security_same_origin() -> None:
    assert same_origin("http://localhost:9000", "localhost:9000")
    assert same_origin("https://abc.trycloudflare.com", "abc.trycloudflare.com")
    assert same_origin("http://[::1]:7860", "[::1]:7860")
    assert not same_origin("http://localhost:9000", "localhost:7860")
    assert not same_origin("http://evil.example", "localhost")
    assert not same_origin("https://abc.trycloudflare.com", "abc.trycloudflare.com:80")
    assert not same_origin("file://", "localhost")
    assert origin_key("null") is None and origin_key("http://x/path") is None


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("/runs/1?tab=a", "/runs/1?tab=a"),
        ("//evil.com", "/"),
        ("https://evil.com", "/"),
        ("/\\evil", "/"),
        (None, "/"),
    ],
)
def test_security_safe_next(value: str | None, want: str) -> None:
    assert safe_next(value) == want


def test_security_login_page_escapes_and_is_self_contained() -> None:
    page = render_login("basic", '/x"><script>alert(1)</script>', "bad <b>").decode()
    assert "<script>" not in page and "&lt;b&gt;" in page
    assert "http://" not in page and "https://" not in page  # no external assets
    assert 'autocomplete="current-password"' in page and "<label" in page
    assert 'name="token"' in render_login("local", "/").decode()


def test_security_token_buckets_refill() -> None:
    buckets = TokenBuckets(capacity=2, per_second=20)
    assert buckets.take("a") and buckets.take("a") and not buckets.take("a")
    assert buckets.take("b")  # per key
    time.sleep(0.1)
    assert buckets.take("a")


def test_security_cookie_helpers() -> None:
    header = "theme=dark; backprop_session_7860=abc.def; lang=en"
    assert read_cookie(header, "backprop_session_7860") == "abc.def"
    assert read_cookie(header, "missing") is None
    assert drop_cookie(header, "backprop_session_7860") == "theme=dark; lang=en"


def test_security_reflex_socket_token_is_not_a_login_attempt() -> None:
    from backpropagate.server.security.ratelimit import carries_credentials

    reflex_socket = {
        "type": "websocket",
        "path": "/_event/",
        "headers": [],
        "query_string": b"token=abc&EIO=4",
    }
    assert not carries_credentials(reflex_socket)
    page = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b"token=abc"}
    assert carries_credentials(page)
    assert carries_credentials({**page, "query_string": b"", "headers": [(b"authorization", b"Basic x")]})
