"""Request shape limits, checked before the app reads anything: URL length, NUL bytes, body size.

A URL longer than the limits (or with a path segment longer than a file name can be) gets 414
``INPUT_URL_TOO_LONG``; a NUL byte or another control
character in the path or query gets 400 ``INPUT_URL_INVALID`` (neither is echoed back). A body
larger than the cap gets 413 ``INPUT_REQUEST_TOO_LARGE``: at once when Content-Length says so,
otherwise as soon as the running count passes the cap (chunked bodies), so nothing past the cap is
ever buffered. File uploads have their own, larger cap; their routes check the exact limit.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from backpropagate.errors import ErrorCode
from backpropagate.server.security.asgi import (
    GUARDED,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    header,
    refuse,
    send_error,
)

MAX_PATH_BYTES = 2048
MAX_QUERY_BYTES = 8192
# Ids and file names: no file system takes a name longer than 255 bytes, so no route needs one.
MAX_SEGMENT_BYTES = 255
# A query value is an id, a relative file name or a model name; a longer one is not a request.
MAX_QUERY_VALUE_BYTES = 1024
# The routes that take a file: the API's data set upload and the web app's own upload endpoint.
UPLOAD_PATHS = frozenset({"/api/datasets", "/_upload"})
# Multipart framing around an upload at the route's limit must still reach the route's own check.
UPLOAD_SLACK = 1 << 20
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]|%(?:[01][0-9a-fA-F]|7[fF])")


class BodyTooLarge(Exception):
    """Raised inside the app's ``receive`` once the body passed the cap (the 413 is already sent)."""


class RequestLimits:
    """Refuse malformed or oversized requests before the app behind sees them."""

    def __init__(self, app: ASGIApp, max_body: int, max_upload: int) -> None:
        self.app = app
        self.max_body = max_body
        self.max_upload = max_upload + UPLOAD_SLACK

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in GUARDED:
            return await self.app(scope, receive, send)
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        query = scope.get("query_string", b"")
        if (
            len(raw_path) > MAX_PATH_BYTES
            or len(query) > MAX_QUERY_BYTES
            or any(
                len(part.encode("utf-8", "surrogateescape")) > MAX_SEGMENT_BYTES
                for part in scope["path"].split("/")
            )
        ):
            return await refuse(scope, receive, send, ErrorCode.INPUT_URL_TOO_LONG)
        if _CONTROL.search(raw_path) or _CONTROL.search(query) or "\x00" in scope["path"]:
            return await refuse(scope, receive, send, ErrorCode.INPUT_URL_INVALID)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        limit = self.max_upload if scope["path"].rstrip("/") in UPLOAD_PATHS else self.max_body
        length = header(scope, "content-length")
        if length is not None:
            if not length.strip().isdigit():
                return await send_error(send, ErrorCode.INPUT_REQUEST_INVALID, "Bad Content-Length header.")
            if int(length) > limit:
                return await send_error(send, ErrorCode.INPUT_REQUEST_TOO_LARGE, _too_large(limit))
        await self._counted(scope, receive, send, limit)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        started = over = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    if not started:
                        await send_error(send, ErrorCode.INPUT_REQUEST_TOO_LARGE, _too_large(limit))
                    raise BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the 413 went out; whatever the app answers after it is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise  # the app failed on its own; only the refusal we caused is swallowed


def _query_values(query: bytes) -> list[bytes]:
    return [unquote_to_bytes(p.partition(b"=")[2].replace(b"+", b" ")) for p in query.split(b"&")]


def _too_large(limit: int) -> str:
    return f"The request body is larger than {limit // 1024} KB."
