"""An open WebSocket stops working once its session ends (logout or expiry)."""

from __future__ import annotations

import asyncio

from test_security_guard import free_port, make_policy

from backpropagate.server.security.authenticate import Authenticate
from backpropagate.server.security.sessions import Authenticator


def test_hardening_open_socket_closed_after_logout() -> None:
    policy, _ = make_policy("basic", free_port())
    auth = Authenticator(policy)
    cookie = auth.start_session("alice")
    sid = auth.session_id(cookie)
    echoed: list[str] = []

    async def echo_app(scope, receive, send) -> None:
        await receive()  # connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message["text"]})

    incoming = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "one"},
        {"type": "logout"},
        {"type": "websocket.receive", "text": "two"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        message = incoming.pop(0)
        if message["type"] == "logout":
            auth.end_session(sid)
            message = incoming.pop(0)
        return message

    async def send(message: dict) -> None:
        sent.append(message)
        if message["type"] == "websocket.send":
            echoed.append(message["text"])

    scope = {
        "type": "websocket",
        "path": "/_event",
        "query_string": b"",
        "headers": [(b"cookie", f"{auth.cookie_name}={cookie}".encode())],
    }
    asyncio.run(Authenticate(echo_app, auth)(scope, receive, send))
    assert echoed == ["one"]
    assert sent[-1] == {"type": "websocket.close", "code": 1008}


def test_hardening_cookie_from_another_instance_refused() -> None:
    policy, _ = make_policy("basic", free_port())
    first, second = Authenticator(policy), Authenticator(policy)
    cookie = first.start_session("alice")
    assert first.session_id(cookie) is not None
    second._sessions.update(first._sessions)  # even the same session id is refused: the MAC differs
    assert second.session_id(cookie) is None
