"""Small ASGI helpers the guard's layers share: headers, JSON refusals, WebSocket refusal."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GUARDED = ("http", "websocket")


def header(scope: Scope, name: str) -> str | None:
    """The first value of a request header (names compared in lower case), decoded as latin-1."""
    key = name.lower().encode("latin-1")
    for k, v in scope.get("headers", []):
        if k.lower() == key:
            return v.decode("latin-1")
    return None


def without_headers(scope: Scope, *names: str) -> Scope:
    """A copy of ``scope`` whose headers lack ``names``."""
    drop = {n.lower().encode("latin-1") for n in names}
    return {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() not in drop]}


def client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def is_api_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    raw = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, data: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_response(send, status, json.dumps(data).encode(), "application/json", headers)


async def send_error(
    send: Send, code: ErrorCode, message: str | None = None, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer with the catalogued error body ``{"code", "message", "hint", "retryable"}``."""
    err = BackpropError(code, message)
    await send_json(send, err.http_status, err.to_dict(), headers)


async def refuse_websocket(receive: Receive, send: Send, code: int = 1008) -> None:
    """Close a WebSocket before accepting it: the server answers the handshake with HTTP 403."""
    message = await receive()
    if message.get("type") == "websocket.connect":
        await send({"type": "websocket.close", "code": code})


async def refuse(
    scope: Scope, receive: Receive, send: Send, code: ErrorCode, message: str | None = None
) -> None:
    """Refuse an HTTP request with a JSON error, or a WebSocket before it is accepted."""
    if scope["type"] == "websocket":
        await refuse_websocket(receive, send)
    else:
        await send_error(send, code, message)


async def read_body(receive: Receive, limit: int = 16_384) -> bytes | None:
    """The request body, or None when it is larger than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
