"""Rate limits per client IP: a generous bucket for all requests, a strict one for failed logins."""

from __future__ import annotations

import ipaddress
import time
from urllib.parse import parse_qs

from backpropagate.errors import ErrorCode
from backpropagate.logs import get_logger
from backpropagate.server.security.asgi import (
    GUARDED,
    ASGIApp,
    Receive,
    Scope,
    Send,
    client_ip,
    header,
    refuse,
)
from backpropagate.server.security.policy import is_loopback

log = get_logger(__name__)

LOGIN_PATHS = frozenset({"/login", "/api/auth/login"})


class TokenBuckets:
    """One token bucket per key: ``capacity`` tokens, refilled at ``per_second``."""

    def __init__(self, capacity: float, per_second: float, max_keys: int = 10_000) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.per_second)

    def take(self, key: str, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens; False (and nothing spent) when there are not enough."""
        now = time.monotonic()
        tokens = self._level(key, now)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - cost, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return True

    def empty(self, key: str) -> bool:
        return self._level(key, time.monotonic()) < 1.0

    def _prune(self, now: float) -> None:
        # Full buckets carry no information; dropping them bounds memory under a flood of IPs.
        full = [k for k in self._buckets if self._level(k, now) >= self.capacity]
        for key in full:
            del self._buckets[key]


class LoginThrottle:
    """Counts failed credential checks per IP; an empty bucket blocks further attempts."""

    def __init__(self, failures: int = 5, per_minutes: float = 1.0) -> None:
        self.buckets = TokenBuckets(failures, failures / (per_minutes * 60.0))

    def reserve(self, ip: str) -> bool:
        """Count an attempt before its credentials are checked; False when the IP is blocked.

        Counting first means parallel guesses cannot all pass the check before any is recorded.
        Call ``refund`` when the credentials turn out right.
        """
        if not self.buckets.take(ip):
            return False
        if self.blocked(ip):
            log.warning("failed logins from %s reached the limit; refusing its attempts for now", ip)
        return True

    def refund(self, ip: str) -> None:
        tokens, last = self.buckets._buckets.get(ip, (self.buckets.capacity, time.monotonic()))
        self.buckets._buckets[ip] = (min(self.buckets.capacity, tokens + 1.0), last)

    def record_failure(self, ip: str) -> None:
        # The address only: a mistyped password often lands in the user name field.
        self.buckets.take(ip)
        if self.blocked(ip):
            log.warning("failed logins from %s reached the limit; refusing its attempts for now", ip)
        else:
            log.info("failed login from %s", ip)

    def blocked(self, ip: str) -> bool:
        return self.buckets.empty(ip)


def carries_credentials(scope: Scope) -> bool:
    """Whether this request tries to log in (form, JSON login, Basic/Bearer header or ?token=)."""
    if scope["type"] == "http" and scope.get("method") == "POST" and scope["path"] in LOGIN_PATHS:
        return True
    if header(scope, "authorization") is not None:
        return True
    # Only HTTP: Reflex's own socket carries an unrelated ``?token=`` (its client id) on /_event.
    return scope["type"] == "http" and "token" in parse_qs(scope.get("query_string", b"").decode("latin-1"))


class RateLimit:
    """429 AUTH_RATE_LIMITED when an IP sends too much, or keeps trying after failed logins."""

    def __init__(
        self,
        app: ASGIApp,
        throttle: LoginThrottle,
        capacity: float = 600,
        per_second: float = 50,
        trust_tunnel_ip: bool = False,
    ) -> None:
        self.app = app
        self.throttle = throttle
        self.requests = TokenBuckets(capacity, per_second)
        self.trust_tunnel_ip = trust_tunnel_ip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in GUARDED:
            return await self.app(scope, receive, send)
        scope = self._with_tunnel_client(scope)
        ip = client_ip(scope)
        if not self.requests.take(ip):
            return await refuse(scope, receive, send, ErrorCode.AUTH_RATE_LIMITED)
        if self.throttle.blocked(ip) and carries_credentials(scope):
            return await refuse(
                scope, receive, send, ErrorCode.AUTH_RATE_LIMITED, "Too many failed logins from this address."
            )
        await self.app(scope, receive, send)

    def _with_tunnel_client(self, scope: Scope) -> Scope:
        """Behind the share tunnel every request comes from 127.0.0.1; Cloudflare names the real client.

        Without this, one visitor's failed logins would lock everyone on the tunnel out. The header
        is believed only from a loopback peer (cloudflared runs on this machine).
        """
        if not self.trust_tunnel_ip or not is_loopback(client_ip(scope)):
            return scope
        real = header(scope, "cf-connecting-ip")
        if not real:
            return scope
        try:
            address = str(ipaddress.ip_address(real.strip()))
        except ValueError:
            return scope
        return {**scope, "client": (address, 0)}
