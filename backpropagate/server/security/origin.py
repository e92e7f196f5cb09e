"""Origin check: state-changing requests and every WebSocket upgrade must come from our own pages.

This stops cross-site request forgery and cross-site WebSocket hijacking. A request with no
Origin is let through only when it carries an Authorization header (HTTP Basic or Bearer) and is
not a WebSocket: browsers attach cookies to forged requests on their own, never an Authorization
header, so such a client is not a browser being abused. Its cookies are dropped so only the
header can authenticate it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from backpropagate.errors import ErrorCode
from backpropagate.server.security.asgi import (
    GUARDED,
    ASGIApp,
    Receive,
    Scope,
    Send,
    header,
    refuse,
    without_headers,
)
from backpropagate.server.security.hosts import split_host

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_key(origin: str) -> tuple[str, int] | None:
    """``"https://Example.org"`` -> ("example.org", 443); None when it is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        return None
    return parts.hostname.lower().rstrip("."), port or DEFAULT_PORTS[parts.scheme]


def same_origin(origin: str, host_header: str | None) -> bool:
    """Whether the Origin names the host (and port) this request was sent to."""
    key = origin_key(origin)
    host = split_host(host_header or "")
    if key is None or host is None:
        return False
    scheme = urlsplit(origin.strip()).scheme
    return key == (host[0], host[1] or DEFAULT_PORTS[scheme])


class OriginCheck:
    """403 AUTH_ORIGIN_FORBIDDEN (or a refused WebSocket) for a foreign or missing Origin."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str], allow_missing: bool = False) -> None:
        self.app = app
        self.allowed = {k for k in (origin_key(o) for o in allowed_origins) if k}
        # serve-api: scripts and the CLI send no Origin (browsers always do on POSTs and sockets);
        # their cookies are dropped, so only a header or the peer check can let them in.
        self.allow_missing = allow_missing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in GUARDED:
            return await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("method", "GET").upper() not in STATE_CHANGING:
            return await self.app(scope, receive, send)
        origin = header(scope, "origin")
        if origin is None or origin == "null":
            if origin is None and self.allow_missing:
                return await self.app(without_headers(scope, "cookie"), receive, send)
            if scope["type"] == "http" and header(scope, "authorization"):
                return await self.app(without_headers(scope, "cookie"), receive, send)
            return await refuse(
                scope, receive, send, ErrorCode.AUTH_ORIGIN_FORBIDDEN, "The request has no Origin."
            )
        if same_origin(origin, header(scope, "host")) or origin_key(origin) in self.allowed:
            return await self.app(scope, receive, send)
        await refuse(scope, receive, send, ErrorCode.AUTH_ORIGIN_FORBIDDEN)
