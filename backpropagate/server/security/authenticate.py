"""Authenticate: every request needs a session cookie, HTTP Basic, or (local mode) the launch token.

Unauthenticated page loads are sent to /login, API calls get 401 AUTH_REQUIRED, WebSockets are
refused before accept. The app behind sees the user in ``scope["backprop.user"]`` and never the
credentials themselves (the Authorization header and our cookie are removed).
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import parse_qsl, quote, urlencode

from backpropagate.errors import ErrorCode
from backpropagate.server.security.asgi import (
    GUARDED,
    ASGIApp,
    Receive,
    Scope,
    Send,
    client_ip,
    header,
    is_api_path,
    refuse,
    send_response,
    without_headers,
)
from backpropagate.server.security.peers import is_same_user
from backpropagate.server.security.ratelimit import BLOCKED, CHECK
from backpropagate.server.security.sessions import (
    LOCAL_USER,
    Authenticator,
    HashingBusy,
    drop_cookie,
    read_cookie,
)

EXEMPT_PATHS = frozenset({"/login", "/api/auth/login", "/ping", "/_health", "/favicon.ico"})


def is_https(scope: Scope) -> bool:
    # A tunnel (cloudflared) ends TLS and forwards plain HTTP; its header only decides the Secure flag.
    return scope.get("scheme") in ("https", "wss") or header(scope, "x-forwarded-proto") == "https"


class Authenticate:
    """Let through only requests that prove who they are."""

    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in GUARDED or scope["path"] in EXEMPT_PATHS:
            return await self.app(scope, receive, send)
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if (
            scope["type"] == "http"
            and any(k == "token" for k, _ in query)
            and self.auth.policy.mode == "local"
        ):
            return await self._exchange_token(scope, receive, send, query)

        authorization = header(scope, "authorization")
        sid: str | None = None
        if authorization is not None:
            try:
                user = await self._check_authorization(authorization, client_ip(scope))
            except HashingBusy:
                return await refuse(scope, receive, send, ErrorCode.AUTH_RATE_LIMITED)
            if user is None:
                return await refuse(scope, receive, send, ErrorCode.AUTH_INVALID_CREDENTIALS)
        else:
            sid = self.auth.session_id(read_cookie(header(scope, "cookie"), self.auth.cookie_name))
            user = self.auth.session_user(sid)
            if user is None and self.auth.policy.same_user_peers and is_same_user(scope):
                user = LOCAL_USER  # serve-api: this user's own CLI and scripts need no token
        if user is None:
            return await self._unauthenticated(scope, receive, send)

        inner = without_headers(scope, "authorization", "cookie")
        cookies = drop_cookie(header(scope, "cookie") or "", self.auth.cookie_name)
        if cookies:
            inner["headers"].append((b"cookie", cookies.encode("latin-1")))
        inner["backprop.user"] = user
        inner["backprop.session"] = sid
        inner["state"] = {**scope.get("state", {}), "user": user}
        if scope["type"] == "websocket" and sid is not None:
            receive, send = self._bound_to_session(sid, receive, send)
        await self.app(inner, receive, send)

    def _bound_to_session(self, sid: str, receive: Receive, send: Send) -> tuple[Receive, Send]:
        """Re-check the session on every socket message; close with 1008 once it ended or expired."""
        ended = False

        async def close() -> None:
            nonlocal ended
            if not ended:
                ended = True
                await send({"type": "websocket.close", "code": 1008})

        async def checked_receive() -> dict:
            message = await receive()
            if message["type"] == "websocket.receive" and not self.auth.session_alive(sid):
                await close()
                return {"type": "websocket.disconnect", "code": 1008}
            return message

        async def checked_send(message: dict) -> None:
            if ended:
                return
            if message["type"] == "websocket.send" and not self.auth.session_alive(sid):
                return await close()
            await send(message)

        return checked_receive, checked_send

    async def _check_authorization(self, value: str, ip: str) -> str | None:
        """The user an Authorization header proves. Every uncached check is counted before it runs
        (so parallel guesses cannot all slip under the limit); raises HashingBusy when blocked."""
        scheme, _, credentials = value.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            if self.auth.check_token(credentials.strip()):
                return LOCAL_USER
            self.auth.throttle.record_failure(ip)
            return None
        if scheme == "basic" and self.auth.policy.users:
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            user, sep, password = decoded.partition(":")
            if sep and self.auth.cached_password(user, password):
                return user
            throttle = self.auth.throttle
            verdict = throttle.attempt(ip, user, password)
            if verdict == BLOCKED:
                raise HashingBusy
            if verdict == CHECK and sep and await self.auth.check_password(user, password):
                throttle.refund(ip, user)
                return user
            throttle.failed(user, password)
            return None
        self.auth.throttle.record_failure(ip)
        return None

    async def _exchange_token(
        self, scope: Scope, receive: Receive, send: Send, query: list[tuple[str, str]]
    ) -> None:
        """``GET /any/page?token=T``: set the session cookie and reload the page without the token."""
        token = next(v for k, v in query if k == "token")
        if not self.auth.check_token(token):
            self.auth.throttle.record_failure(client_ip(scope))
            return await refuse(
                scope, receive, send, ErrorCode.AUTH_INVALID_CREDENTIALS, "The launch token is wrong."
            )
        rest = urlencode([(k, v) for k, v in query if k != "token"])
        # One leading slash only: "//evil.example" would be read as another site.
        location = "/" + quote(scope["path"].lstrip("/")) + (f"?{rest}" if rest else "")
        cookie = self.auth.set_cookie(self.auth.start_session(LOCAL_USER), secure=is_https(scope))
        await send_response(send, 303, b"", "text/plain", [(b"location", location.encode("latin-1")), cookie])

    async def _unauthenticated(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        if scope["type"] == "http" and method in ("GET", "HEAD") and not is_api_path(scope["path"]):
            target = scope["path"] + (
                f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
            )
            location = "/login?" + urlencode({"next": target})
            return await send_response(
                send, 303, b"", "text/plain", [(b"location", location.encode("latin-1"))]
            )
        await refuse(scope, receive, send, ErrorCode.AUTH_REQUIRED)
