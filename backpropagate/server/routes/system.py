"""/api/system: versions, GPUs and features, from `backprop info --json` run once in a subprocess;
and /api/docs, the Swagger UI page, served with its own assets.

The subprocess keeps torch out of the server process; its answer is cached for the server's life.
FastAPI's own docs page loads Swagger UI from a CDN, which the guard's CSP (and an offline machine)
refuses, so the page is blank. The assets come from the ``fastapi-offline`` package instead
(Swagger UI 5, which renders the OpenAPI 3.1 schema FastAPI writes), under /api/docs/assets/.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from backpropagate import __version__
from backpropagate.errors import BackpropError, ErrorCode

router = APIRouter(tags=["system"])

_lock = asyncio.Lock()


async def machine_info() -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backpropagate", "info", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise BackpropError(ErrorCode.RUNTIME_INTERNAL, f"`backprop info` failed: {err.decode()[-2000:]}")
    return json.loads(out)


@router.get("/system")
async def system(request: Request) -> dict[str, Any]:
    """Versions, torch/CUDA, GPUs, optional features, home folder, and the scheduler's view."""
    state = request.app.state
    async with _lock:
        if getattr(state, "system_info", None) is None:
            state.system_info = await machine_info()
    service = state.service
    scheduler = service.scheduler
    return {
        **state.system_info,
        "server": {
            "version": __version__,
            "gpu_indices": scheduler.gpu_indices,
            "active_runs": sorted(scheduler.workers),
            "queued_runs": list(scheduler.queue),
            "max_concurrent_runs": scheduler.max_cpu_runs,
        },
    }


# The only files served from the package's folder: names are matched exactly, never joined.
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}


def _assets_dir() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


@router.get("/docs", include_in_schema=False)
async def api_docs(request: Request) -> HTMLResponse:
    """Swagger UI for this API, every asset from this server."""
    root = request.scope.get("root_path", "")
    assets = f"{root}/api/docs/assets"
    return get_swagger_ui_html(
        openapi_url=f"{root}/api/openapi.json",
        title="Backpropagate API",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
    )


@router.get("/docs/assets/{name}", include_in_schema=False)
async def api_docs_asset(name: str) -> FileResponse:
    media_type = DOCS_ASSETS.get(name)
    if media_type is None:
        raise BackpropError(ErrorCode.STATE_NOT_FOUND, f"No docs asset {name!r}.")
    return FileResponse(
        _assets_dir() / name, media_type=media_type, headers={"Cache-Control": "max-age=86400"}
    )
