"""Rate limits: per client IP a generous bucket for all requests and a strict one for failed
logins; per account a growing delay after failed logins (so rotating source addresses, or every
user sharing a proxy's address, changes nothing). The client IP is the peer's, or the one a
configured reverse proxy names in X-Forwarded-For.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Iterable
from urllib.parse import parse_qs

from backpropagate.errors import BackpropError, ErrorCode
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
from backpropagate.server.security.peers import socket_owner
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


class AccountBackoff:
    """Failed logins per account name: ``free`` failures, then each one doubles a wait (capped).

    The right password works again as soon as the wait is over, and resets the count: an attacker
    can slow an account down, never lock its owner out for longer than ``max_delay`` seconds.
    A wrong password already tried for the account is remembered (as a keyed digest) and does not
    count again: a script retrying a stale password is not guessing, and must not slow the owner.
    """

    def __init__(self, free: int = 5, max_delay: float = 60.0, max_keys: int = 10_000) -> None:
        self.free = free
        self.max_delay = max_delay
        self.max_keys = max_keys
        self._state: dict[str, tuple[int, float]] = {}  # name -> (failures, blocked until)
        self._wrong: dict[str, list[bytes]] = {}  # name -> digests of its recent wrong passwords
        self._key = secrets.token_bytes(32)

    def wait(self, name: str) -> float:
        """Seconds until ``name`` may try again (0: now)."""
        return max(0.0, self._state.get(name, (0, 0.0))[1] - time.monotonic())

    def reserve(self, name: str) -> bool:
        """Count an attempt for ``name`` before it is checked; False while the account waits."""
        now = time.monotonic()
        failures, until = self._state.get(name, (0, 0.0))
        if until > now:
            return False
        failures += 1
        if failures >= self.free:
            until = now + min(self.max_delay, 2.0 ** (failures - self.free))
            # Not the name itself: a password typed into the user name field would land in the log.
            log.warning(
                "failed logins for account %s: %d; next try in %.0f s", _tag(name), failures, until - now
            )
        if len(self._state) >= self.max_keys:
            self._state = {k: v for k, v in self._state.items() if v[1] > now}
            self._wrong = {k: v for k, v in self._wrong.items() if k in self._state}
        self._state[name] = (failures, until)
        return True

    def _digest(self, name: str, password: str) -> bytes:
        return hmac.new(self._key, f"{name}\x00{password}".encode(), hashlib.sha256).digest()

    def known_wrong(self, name: str, password: str) -> bool:
        return self._digest(name, password) in self._wrong.get(name, ())

    def failed(self, name: str, password: str) -> None:
        """Remember a wrong password of ``name`` (the last 16 of them)."""
        recent = self._wrong.setdefault(name, [])
        recent.append(self._digest(name, password))
        del recent[:-16]

    def succeeded(self, name: str) -> None:
        self._state.pop(name, None)
        self._wrong.pop(name, None)


def _tag(name: str) -> str:
    return "#" + hashlib.sha256(name.encode()).hexdigest()[:8]


CHECK, WRONG, BLOCKED = "check", "wrong", "blocked"


class LoginThrottle:
    """Counts failed credential checks per IP (and per account); an empty bucket blocks attempts."""

    def __init__(self, failures: int = 5, per_minutes: float = 1.0) -> None:
        self.buckets = TokenBuckets(failures, failures / (per_minutes * 60.0))
        # Twice the address limit: one address alone meets its own limit first, so a typo-prone
        # user (or a neighbour on a shared address) does not slow the account for everyone.
        self.accounts = AccountBackoff(free=2 * failures)

    def attempt(self, ip: str, account: str, password: str) -> str:
        """Count a login attempt before its password is checked: CHECK it, or answer at once.

        WRONG: this account already failed with this very password (401, no hash computed, counted
        against the address only). BLOCKED: the address or the account must wait (429).
        Call ``refund`` when the password turns out right, ``failed`` when it does not.
        """
        if self.accounts.wait(account) > 0:
            return BLOCKED
        if self.accounts.known_wrong(account, password):
            return WRONG if self.reserve(ip) else BLOCKED
        return CHECK if self.reserve(ip, account) else BLOCKED

    def failed(self, account: str, password: str) -> None:
        self.accounts.failed(account, password)

    def reserve(self, ip: str, account: str | None = None) -> bool:
        """Count an attempt before its credentials are checked; False when the IP or account is blocked.

        Counting first means parallel guesses cannot all pass the check before any is recorded.
        Call ``refund`` when the credentials turn out right.
        """
        if account is not None and self.accounts.wait(account) > 0:
            return False
        if not self.buckets.take(ip):
            return False
        if account is not None and not self.accounts.reserve(account):
            return False
        if self.blocked(ip):
            log.warning("failed logins from %s reached the limit; refusing its attempts for now", ip)
        return True

    def refund(self, ip: str, account: str | None = None) -> None:
        tokens, last = self.buckets._buckets.get(ip, (self.buckets.capacity, time.monotonic()))
        self.buckets._buckets[ip] = (min(self.buckets.capacity, tokens + 1.0), last)
        if account is not None:
            self.accounts.succeeded(account)

    def record_failure(self, ip: str) -> None:
        # The address only: a mistyped password often lands in the user name field.
        self.buckets.take(ip)
        if self.blocked(ip):
            log.warning("failed logins from %s reached the limit; refusing its attempts for now", ip)
        else:
            log.info("failed login from %s", ip)

    def blocked(self, ip: str) -> bool:
        return self.buckets.empty(ip)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_proxies(text: str | Iterable[str]) -> list[Network]:
    """``"10.0.0.1, 192.168.0.0/16"`` -> networks; a bad entry is a start-up error naming it."""
    entries = text.split(",") if isinstance(text, str) else list(text)
    networks = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise BackpropError(
                ErrorCode.CONFIG_INVALID_SETTING,
                f"BACKPROPAGATE_SERVER__TRUSTED_PROXIES: {entry!r} is not an IP address or network.",
                hint="List proxy addresses or networks separated by commas, e.g. 10.0.0.5,192.168.0.0/16.",
            ) from None
    return networks


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


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
        trusted_proxies: Iterable[Network] = (),
    ) -> None:
        self.app = app
        self.throttle = throttle
        self.requests = TokenBuckets(capacity, per_second)
        self.trust_tunnel_ip = trust_tunnel_ip
        self.proxies = list(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in GUARDED:
            return await self.app(scope, receive, send)
        scope = self._with_forwarded_client(self._with_tunnel_client(scope))
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
        is believed only from a loopback peer (cloudflared runs on this machine, as this user): from
        another local user's process it is ignored, so no one picks a fresh address per guess.
        """
        if not self.trust_tunnel_ip or not is_loopback(client_ip(scope)):
            return scope
        real = _address(header(scope, "cf-connecting-ip") or "")
        if real is None or _another_users_socket(scope):
            return scope
        return {**scope, "client": (str(real), 0)}

    def _trusted(self, ip: str) -> bool:
        address = _address(ip)
        return address is not None and any(address in net for net in self.proxies)

    def _with_forwarded_client(self, scope: Scope) -> Scope:
        """Behind a configured reverse proxy, the client is the last X-Forwarded-For hop that is
        not itself a trusted proxy. From any other peer the header is ignored (anyone can send it)."""
        if not self.proxies or not self._trusted(client_ip(scope)):
            return scope
        hops = [h.strip() for v in _all_headers(scope, b"x-forwarded-for") for h in v.split(",")]
        for hop in reversed([h for h in hops if h]):
            address = _address(hop)
            if address is None:
                return scope  # a malformed chain: keep the proxy's own address
            if not self._trusted(str(address)):
                return {**scope, "client": (str(address), 0)}
        return scope


def _all_headers(scope: Scope, name: bytes) -> list[str]:
    return [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == name]


def _another_users_socket(scope: Scope) -> bool:
    """Whether the kernel says another OS user owns the client's socket (unknown: False)."""
    owner = socket_owner(scope)
    return owner is not None and owner != os.getuid()
