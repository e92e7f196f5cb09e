"""Security headers on every HTTP response: a CSP a Reflex production build runs under, no framing."""

from __future__ import annotations

from backpropagate.server.security.asgi import ASGIApp, Message, Receive, Scope, Send

# Reflex's production bundle injects inline styles and a small inline bootstrap script, so both
# need 'unsafe-inline'; its event loop runs rx.call_script / call_function through eval(), hence
# 'unsafe-eval'. The socket goes to the page's own host only: CSP3 'self' covers ws:/wss: there.
DEFAULT_CSP = (
    "default-src 'self'; "
    "script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; "
    "font-src 'self' data:; "
    "connect-src 'self'; "
    "object-src 'none'; "
    "base-uri 'self'; "
    "form-action 'self'; "
    "frame-ancestors 'none'"
)


def security_headers(csp: str = DEFAULT_CSP) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", csp.encode("latin-1")),
        (b"x-content-type-options", b"nosniff"),
        # Not "no-referrer": under it browsers send `Origin: null` on same-origin form posts, which
        # the Origin check must refuse. "same-origin" still never shows a URL to another site.
        (b"referrer-policy", b"same-origin"),
        (b"x-frame-options", b"DENY"),
        (b"cross-origin-opener-policy", b"same-origin"),
    ]


class SecurityHeaders:
    """Add the headers to each HTTP response that does not already set them."""

    def __init__(self, app: ASGIApp, csp: str = DEFAULT_CSP) -> None:
        self.app = app
        self.headers = security_headers(csp)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
