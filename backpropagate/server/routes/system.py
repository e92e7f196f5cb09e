"""/api/system: versions, GPUs and features, from `backprop info --json` run once in a subprocess.

The subprocess keeps torch out of the server process; its answer is cached for the server's life.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from fastapi import APIRouter, Request

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
