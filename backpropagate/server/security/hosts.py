"""Host allowlist: answer only to loopback names (any port) and the policy's hosts (DNS rebinding)."""

from __future__ import annotations

from backpropagate.errors import ErrorCode
from backpropagate.server.security.asgi import GUARDED, ASGIApp, Receive, Scope, Send, header, refuse

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def split_host(value: str) -> tuple[str, int | None] | None:
    """``"[::1]:9000"`` -> ("::1", 9000); ``"Example.org"`` -> ("example.org", None); junk -> None."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else ""
    else:
        if value.count(":") > 1:  # a bare IPv6 literal is not a valid Host header
            return None
        name, _, port_text = value.partition(":")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        return name.rstrip("."), int(port_text)
    if not name or any(c in name for c in "/@?# \\"):
        return None
    return name.rstrip("."), None


class HostAllowlist:
    """421 AUTH_HOST_FORBIDDEN (or a refused WebSocket) for a Host that is not ours."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        # Entries may carry a port ("gpu-box:7860"); like loopback, any port of an allowed name is fine.
        names = (split_host(h) for h in allowed_hosts)
        self.allowed = LOOPBACK_HOSTS | {n[0] for n in names if n}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in GUARDED:
            return await self.app(scope, receive, send)
        parsed = split_host(header(scope, "host") or "")
        if parsed is None or parsed[0] not in self.allowed:
            return await refuse(scope, receive, send, ErrorCode.AUTH_HOST_FORBIDDEN)
        await self.app(scope, receive, send)
