"""The API server: ``create_app()`` builds the FastAPI app (routes under /api, one file each).

It holds one RunService for its lifetime. Errors always answer ``{"code", "message", "hint"}``
with the catalog's HTTP status. The server never imports torch.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from backpropagate import __version__
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.logs import configure_from_settings, get_logger
from backpropagate.runs.hub import HEARTBEAT_S
from backpropagate.runs.service import RunService
from backpropagate.settings import Settings, get_settings

log = get_logger(__name__)


_LONG_WORD = re.compile(r"\S{200,}")


def _clip_words(text: str) -> str:
    """Shorten every run of 200+ non-space characters: an id, name or value from the request
    (`No run with id 'AAAA…'`) is never sent back at length, whatever route put it there."""
    return _LONG_WORD.sub(lambda m: f"{m.group(0)[:80]}… ({len(m.group(0))} characters)", text)


def error_response(err: BackpropError) -> JSONResponse:
    message = _clip_words(err.message)
    body = {"code": str(err.code), "message": message, "hint": err.hint, "retryable": err.retryable}
    if err.details:
        body["details"] = err.details
    return JSONResponse(body, status_code=err.http_status)


def _validation_code(request: Request, exc: RequestValidationError) -> ErrorCode:
    errors = exc.errors()
    malformed = any(e.get("type") in ("json_invalid", "model_attributes_type", "dict_type") for e in errors)
    creates_run = request.method == "POST" and request.url.path.rstrip("/") == "/api/runs"
    return ErrorCode.CONFIG_INVALID if creates_run and not malformed else ErrorCode.INPUT_REQUEST_INVALID


_CLIP = 300


def _clip(text: str) -> str:
    """Never echo a request's input at length in an error answer."""
    return text if len(text) <= _CLIP else text[:_CLIP] + f"… ({len(text)} characters)"


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(_clip(f"{where}: {err.get('msg')}"))
    code = _validation_code(request, exc)
    prefix = "Invalid run configuration: " if code == ErrorCode.CONFIG_INVALID else "Invalid request: "
    return error_response(BackpropError(code, _clip(prefix + "; ".join(parts)), problems=parts[:20]))


async def _on_backprop_error(_request: Request, exc: BackpropError) -> JSONResponse:
    return error_response(exc)


async def _on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        err = BackpropError(ErrorCode.STATE_NOT_FOUND, "No such API route.")
    elif exc.status_code == 405:
        err = BackpropError(ErrorCode.INPUT_REQUEST_INVALID, f"Method not allowed: {exc.detail}")
        err.http_status = 405
    else:
        err = BackpropError(ErrorCode.INPUT_REQUEST_INVALID, str(exc.detail))
        err.http_status = exc.status_code
    return error_response(err)


async def _on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in a request", exc_info=exc)
    return error_response(BackpropError(ErrorCode.RUNTIME_INTERNAL, _clip(f"{type(exc).__name__}: {exc}")))


def create_app(
    settings: Settings | None = None,
    service: RunService | None = None,
    *,
    heartbeat_s: float = HEARTBEAT_S,
    **service_args: Any,
) -> FastAPI:
    """The API app. ``service_args`` go to :class:`RunService` (e.g. ``gpu_indices``)."""
    from backpropagate.server import ws
    from backpropagate.server.routes import datasets, models, runs, system

    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_from_settings("server")
        svc = service or RunService(settings, **service_args)
        app.state.service = svc
        await svc.start()
        try:
            yield
        finally:
            await svc.close()

    app = FastAPI(
        title="Backpropagate API",
        version=__version__,
        docs_url=None,  # routes/system.py serves /api/docs with local assets (no CDN)
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.heartbeat_s = heartbeat_s  # idle WebSockets get {"type": "heartbeat"} this often
    app.add_exception_handler(BackpropError, _on_backprop_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected)
    for module in (runs, datasets, models, system):
        app.include_router(module.router, prefix="/api")
    # Routes other parts of the product add when present: accounts (security), exports, evaluations.
    for name in ("auth", "exports", "evals"):
        try:
            module = importlib.import_module(f"backpropagate.server.routes.{name}")
        except ImportError as exc:
            if exc.name != f"backpropagate.server.routes.{name}":
                raise  # the module exists but is broken: say so at start, not with a 404 later
            continue
        if hasattr(module, "router"):
            app.include_router(module.router, prefix="/api")
    app.include_router(ws.router, prefix="/api")
    return app
