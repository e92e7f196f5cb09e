"""Credentials: server-side sessions behind a signed cookie, passwords, and the launch token.

Session ids live in this process's memory, so logging out (or restarting the server) really ends
a session; the cookie holds only the id, signed with itsdangerous and stamped for expiry.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backpropagate.server.security.passwords import verify_password
from backpropagate.server.security.policy import SecurityPolicy, hash_token
from backpropagate.server.security.ratelimit import LoginThrottle

LOCAL_USER = "local"
MAX_CONCURRENT_HASHES = 4
# Password hashing is slow on purpose; its own small pool keeps a flood of guesses from
# starving the default pool every other route runs in.
_HASH_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="backprop-pwhash")


class HashingBusy(Exception):
    """Too many password checks are already running; answer 429 at once."""


class Authenticator:
    """Checks credentials and owns the session table of one server process."""

    def __init__(self, policy: SecurityPolicy, throttle: LoginThrottle | None = None) -> None:
        from itsdangerous import URLSafeTimedSerializer

        self.policy = policy
        self.throttle = throttle or LoginThrottle()
        self.max_age = int(policy.session_hours * 3600)
        self.cookie_name = f"backprop_session_{policy.port}"  # cookies ignore ports; ours must not clash
        # A per-launch secret and the port in the MAC: another instance on this host refuses our cookie.
        salt = f"backprop-session:{policy.port}:{secrets.token_hex(16)}"
        self._signer = URLSafeTimedSerializer(policy.session_secret, salt=salt)
        self._key = hashlib.sha256(("basic-cache:" + policy.session_secret).encode()).digest()
        self._sessions: dict[str, tuple[str, float]] = {}  # id -> (user, expires at)
        self._verified: dict[bytes, tuple[str, float]] = {}  # HMAC(user:password) -> (user, until)
        self._hashing = 0

    # Sessions -------------------------------------------------------------------------------
    def start_session(self, user: str) -> str:
        """A new session for ``user``; returns the signed cookie value."""
        now = time.time()
        if len(self._sessions) >= 10_000:  # bound memory: forget sessions that have expired
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = (user, now + self.max_age)
        return self._signer.dumps(sid)

    def session_id(self, cookie: str | None) -> str | None:
        """The live session id a cookie carries, or None (bad signature, expired, logged out)."""
        if not cookie:
            return None
        from itsdangerous import BadSignature

        try:
            sid = self._signer.loads(cookie, max_age=self.max_age)
        except BadSignature:  # includes SignatureExpired
            return None
        entry = self._sessions.get(sid) if isinstance(sid, str) else None
        if entry is None:
            return None
        if entry[1] < time.time():
            self._sessions.pop(sid, None)
            return None
        return sid

    def session_alive(self, sid: str) -> bool:
        """Whether session ``sid`` is still in the table and unexpired (re-checked on open sockets)."""
        entry = self._sessions.get(sid)
        return entry is not None and entry[1] >= time.time()

    def session_user(self, sid: str | None) -> str | None:
        entry = self._sessions.get(sid) if sid else None
        return entry[0] if entry else None

    def end_session(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)

    def set_cookie(self, value: str, secure: bool) -> tuple[bytes, bytes]:
        attrs = f"{self.cookie_name}={value}; Path=/; Max-Age={self.max_age}; HttpOnly; SameSite=Lax"
        if secure or self.policy.secure_cookies:
            attrs += "; Secure"
        return b"set-cookie", attrs.encode("latin-1")

    def clear_cookie(self) -> tuple[bytes, bytes]:
        return b"set-cookie", f"{self.cookie_name}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax".encode()

    # Credentials ---------------------------------------------------------------------------
    def check_token(self, token: str | None) -> bool:
        expected = self.policy.local_token_hash
        if not token or not expected:
            return False
        return hmac.compare_digest(hash_token(token), expected)

    def _cache_key(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\x00{password}".encode(), hashlib.sha256).digest()

    def cached_password(self, user: str, password: str) -> bool:
        """Whether this pair was verified recently (API clients send Basic on every request)."""
        hit = self._verified.get(self._cache_key(user, password))
        return bool(hit and hit[1] > time.time() and user in self.policy.users)

    async def check_password(self, user: str, password: str) -> bool:
        """Verify against the argon2 hash in a small pool of its own; remember successes.

        Raises HashingBusy when MAX_CONCURRENT_HASHES checks are already running.
        """
        key = self._cache_key(user, password)
        if self.cached_password(user, password):
            return True
        if self._hashing >= MAX_CONCURRENT_HASHES:
            raise HashingBusy
        self._hashing += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(
                _HASH_POOL, verify_password, password, self.policy.users.get(user)
            )
        finally:
            self._hashing -= 1
        if ok:
            if len(self._verified) > 1000:
                self._verified.clear()
            self._verified[key] = (user, time.time() + self.max_age)
        return ok

    def me(self, user: str) -> dict[str, Any]:
        return {"user": user, "mode": self.policy.mode}


def read_cookie(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a Cookie header."""
    for part in (cookie_header or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def drop_cookie(cookie_header: str, name: str) -> str:
    """The Cookie header without cookie ``name`` (so the app behind the guard never sees it)."""
    return "; ".join(p.strip() for p in cookie_header.split(";") if p.strip().partition("=")[0] != name)
