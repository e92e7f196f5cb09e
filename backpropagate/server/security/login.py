"""The login page and the auth API, answered by the guard itself so they work in front of any app.

GET/POST /login (an HTML form, no scripts or external assets), POST /api/auth/login (JSON),
POST /api/auth/logout and POST /logout, GET /api/auth/me -> {"user", "mode"}.
"""

from __future__ import annotations

import html
import json
from urllib.parse import parse_qs, parse_qsl, quote

from backpropagate.errors import ErrorCode
from backpropagate.server.security.asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    client_ip,
    header,
    read_body,
    send_error,
    send_json,
    send_response,
)
from backpropagate.server.security.authenticate import is_https
from backpropagate.server.security.ratelimit import BLOCKED, WRONG
from backpropagate.server.security.sessions import LOCAL_USER, Authenticator, HashingBusy, read_cookie

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in - Backpropagate</title>
<style>
body{{font-family:system-ui,sans-serif;background:#f6f7f9;color:#1c2024;display:grid;place-items:center;min-height:100vh;margin:0}}
main{{background:#fff;padding:2rem;border-radius:12px;box-shadow:0 2px 12px #0002;width:min(22rem,90vw)}}
h1{{font-size:1.3rem;margin:0 0 1rem}} label{{display:block;margin:.8rem 0 .3rem;font-weight:600}}
input{{width:100%;box-sizing:border-box;padding:.55rem;border:1px solid #8b8d98;border-radius:6px;font-size:1rem}}
button{{margin-top:1.2rem;width:100%;padding:.6rem;border:0;border-radius:6px;background:#3e63dd;color:#fff;font-size:1rem}}
button:focus,input:focus{{outline:3px solid #3e63dd55}} .error{{color:#ce2c31;margin:.5rem 0 0}}
p.note{{color:#60646c;font-size:.9rem}}
</style></head>
<body><main>
<h1>Sign in to Backpropagate</h1>
<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
{fields}
<button type="submit">Sign in</button>
{error}
</form>
</main></body></html>
"""

_USER_FIELDS = """<label for="username">User name</label>
<input id="username" name="username" autocomplete="username" required autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>"""

_TOKEN_FIELDS = """<p class="note">Open the link that <code>backprop ui</code> printed, or paste its token here.</p>
<label for="token">Launch token</label>
<input id="token" name="token" type="password" autocomplete="off" required autofocus>"""


def safe_next(value: str | None) -> str:
    """Only same-site paths: ``/runs`` yes, ``//evil.com`` or ``https://evil.com`` no."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    if any(ord(c) < 32 for c in value) or len(value) > 2048:
        return "/"
    # Percent-encode anything outside ASCII: the value ends up in a latin-1 Location header.
    return quote(value, safe="/?&=%#:;,+-._~!$'()*@")


def render_login(mode: str, next_path: str, error: str | None = None) -> bytes:
    fields = _TOKEN_FIELDS if mode == "local" else _USER_FIELDS
    err = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return _PAGE.format(next=html.escape(next_path), fields=fields, error=err).encode()


class AuthEndpoints:
    """Answer the login/logout/me routes; pass everything else to the app."""

    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = (scope.get("method", "GET"), scope["path"])
        handler = {
            ("GET", "/login"): self.login_page,
            ("HEAD", "/login"): self.login_page,
            ("POST", "/login"): self.login_form,
            ("POST", "/api/auth/login"): self.login_json,
            ("POST", "/api/auth/logout"): self.logout,
            ("POST", "/logout"): self.logout,
            ("GET", "/api/auth/me"): self.me,
        }.get(route)
        if handler is None:
            return await self.app(scope, receive, send)
        await handler(scope, receive, send)

    async def _verify(self, scope: Scope, fields: dict[str, str]) -> str | None:
        """The user these fields prove, or None. The attempt is counted before the check.

        Raises HashingBusy when this IP is blocked or too many checks are running (429).
        """
        ip = client_ip(scope)
        throttle = self.auth.throttle
        if self.auth.policy.mode == "local":
            if not throttle.reserve(ip):
                raise HashingBusy
            if not self.auth.check_token(fields.get("token")):
                return None
            throttle.refund(ip)
            return LOCAL_USER
        # Accounts back off on their own: rotating addresses (or sharing a proxy's) changes nothing.
        name, password = fields.get("username", ""), fields.get("password", "")
        verdict = throttle.attempt(ip, name, password)
        if verdict == BLOCKED:
            raise HashingBusy
        if verdict == WRONG or not (name and password and await self.auth.check_password(name, password)):
            throttle.failed(name, password)
            return None
        throttle.refund(ip, name)
        return name

    async def _verify_or_refuse(self, scope: Scope, send: Send, fields: dict[str, str]) -> str | bool | None:
        """The user, None for wrong credentials, or False when a 429 was already sent."""
        try:
            return await self._verify(scope, fields)
        except HashingBusy:
            await send_error(send, ErrorCode.AUTH_RATE_LIMITED, "Too many login attempts; wait and retry.")
            return False

    async def login_page(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        next_path = safe_next((query.get("next") or ["/"])[0])
        sid = self.auth.session_id(read_cookie(header(scope, "cookie"), self.auth.cookie_name))
        if self.auth.session_user(sid):  # already signed in
            return await send_response(
                send, 303, b"", "text/plain", [(b"location", next_path.encode("latin-1"))]
            )
        await send_response(
            send, 200, render_login(self.auth.policy.mode, next_path), "text/html; charset=utf-8"
        )

    async def login_form(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        fields = dict(parse_qsl((body or b"").decode("utf-8", "replace")))
        next_path = safe_next(fields.get("next"))
        user = await self._verify_or_refuse(scope, send, fields)
        if user is False:
            return None
        if not isinstance(user, str):
            page = render_login(self.auth.policy.mode, next_path, "Wrong credentials. Try again.")
            return await send_response(send, 401, page, "text/html; charset=utf-8")
        cookie = self.auth.set_cookie(self.auth.start_session(user), secure=is_https(scope))
        await send_response(
            send, 303, b"", "text/plain", [(b"location", next_path.encode("latin-1")), cookie]
        )

    async def login_json(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        try:
            data = json.loads(body or b"")
            fields = {k: v for k, v in data.items() if isinstance(v, str)}
        except (ValueError, AttributeError):
            return await send_error(
                send, ErrorCode.INPUT_REQUEST_INVALID, "Send a JSON object with username and password."
            )
        user = await self._verify_or_refuse(scope, send, fields)
        if user is False:
            return None
        if not isinstance(user, str):
            return await send_error(send, ErrorCode.AUTH_INVALID_CREDENTIALS)
        cookie = self.auth.set_cookie(self.auth.start_session(user), secure=is_https(scope))
        await send_json(send, 200, self.auth.me(user), [cookie])

    async def logout(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.auth.end_session(scope.get("backprop.session"))
        if scope["path"] == "/logout":
            return await send_response(
                send, 303, b"", "text/plain", [(b"location", b"/login"), self.auth.clear_cookie()]
            )
        await send_json(send, 200, {"ok": True}, [self.auth.clear_cookie()])

    async def me(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, self.auth.me(scope.get("backprop.user") or ""))
