"""/api/runs: create, list, inspect, stop, resume, clone and delete training runs."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Literal

from fastapi import APIRouter, Body, Query, Response
from pydantic import BaseModel

from backpropagate.config import RunConfig
from backpropagate.runs.fold import downsample
from backpropagate.runs.metrics import read_metrics
from backpropagate.runs.store import Run
from backpropagate.server.routes.deps import ServiceDep

router = APIRouter(tags=["runs"])

StatusName = Literal["queued", "running", "paused", "completed", "failed", "cancelled", "interrupted"]


class RunPublic(BaseModel):
    id: str
    name: str | None
    status: str
    config: dict[str, Any]
    created_at: float
    started_at: float | None
    ended_at: float | None
    pid: int | None
    gpus: list[int]
    exit_code: int | None
    error_code: str | None
    error_message: str | None
    final_metrics: dict[str, Any]
    last_seq: int
    step: int
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    queued_reason: str | None = None  # what a queued run waits for: GPUs, a CPU slot, an earlier run

    @classmethod
    def of(cls, run: Run) -> RunPublic:
        return cls.model_validate(run.model_dump())


class CheckpointPublic(BaseModel):
    step: int
    path: str
    bytes: int
    best: bool
    created_at: float


class ExportPublic(BaseModel):
    format: str
    path: str
    bytes: int
    created_at: float


class MetricsPublic(BaseModel):
    run_id: str
    total_points: int
    steps: list[dict[str, Any]]
    eval: list[dict[str, Any]]


class LogPublic(BaseModel):
    run_id: str
    lines: list[str]


@router.post("/runs", status_code=201, response_model=RunPublic)
async def create_run(config: RunConfig, service: ServiceDep) -> RunPublic:
    """Queue a run. ``data`` may be a path (inside an allowed folder), an uploaded data set id or a hub id.

    Refused at once: an unknown upload id or a missing path (404 DATASET_NOT_FOUND), a path outside
    the allowed folders (403), more GPUs than the machine has (422 CONFIG_GPUS_UNAVAILABLE).
    """
    return RunPublic.of(await service.submit(config))


@router.get("/runs", response_model=list[RunPublic])
async def list_runs(
    service: ServiceDep, status: list[StatusName] | None = Query(None, description="Only these statuses.")
) -> list[RunPublic]:
    return [RunPublic.of(r) for r in await service.list(list(status) if status else None)]


@router.get("/runs/{run_id}", response_model=RunPublic)
async def get_run(run_id: str, service: ServiceDep) -> RunPublic:
    return RunPublic.of(await service.get(run_id))


@router.post("/runs/{run_id}/stop", response_model=RunPublic)
async def stop_run(run_id: str, service: ServiceDep) -> RunPublic:
    """Ask the worker to finish its step, checkpoint and end as ``cancelled`` (resumable)."""
    return RunPublic.of(await service.stop(run_id))


@router.post("/runs/{run_id}/resume", response_model=RunPublic)
async def resume_run(run_id: str, service: ServiceDep) -> RunPublic:
    """Queue a stopped, failed or interrupted run again; it continues from its last checkpoint."""
    return RunPublic.of(await service.resume(run_id))


@router.post("/runs/{run_id}/clone", status_code=201, response_model=RunPublic)
async def clone_run(
    run_id: str,
    service: ServiceDep,
    overrides: dict[str, Any] | None = Body(None, description="RunConfig fields to change in the copy."),
) -> RunPublic:
    return RunPublic.of(await service.clone(run_id, overrides))


@router.delete("/runs/{run_id}", status_code=204)
async def delete_run(run_id: str, service: ServiceDep) -> Response:
    """Delete a run that is not active, with its folder (STATE_RUN_ACTIVE while it is)."""
    await service.delete(run_id)
    return Response(status_code=204)


@router.get("/runs/{run_id}/metrics", response_model=MetricsPublic)
async def run_metrics(
    run_id: str,
    service: ServiceDep,
    max_points: int = Query(1000, ge=0, description="Downsample to about this many points; 0 = all."),
) -> MetricsPublic:
    await service.get(run_id)
    series = await asyncio.to_thread(read_metrics, service.run_dir(run_id) / "events.jsonl")
    steps = series["steps"]
    return MetricsPublic(
        run_id=run_id,
        total_points=len(steps),
        steps=downsample(steps, max_points),
        eval=series["eval"],
    )


@router.get("/runs/{run_id}/checkpoints", response_model=list[CheckpointPublic])
async def run_checkpoints(run_id: str, service: ServiceDep) -> list[CheckpointPublic]:
    await service.get(run_id)
    rows = await asyncio.to_thread(service.store.checkpoints, run_id)
    return [CheckpointPublic.model_validate(r.model_dump()) for r in rows]


@router.get("/runs/{run_id}/exports", response_model=list[ExportPublic])
async def run_exports(run_id: str, service: ServiceDep) -> list[ExportPublic]:
    """Exports made from this run (GGUF, merged weights), oldest first."""
    await service.get(run_id)
    rows = await asyncio.to_thread(service.store.exports, run_id)
    return [ExportPublic.model_validate(r.model_dump()) for r in rows]


def _tail_lines(path: Any, n: int) -> list[str]:
    try:
        with open(path, errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=n)]
    except FileNotFoundError:
        return []


@router.get("/runs/{run_id}/log", response_model=LogPublic)
async def run_log(run_id: str, service: ServiceDep, tail: int = Query(200, ge=1, le=100000)) -> LogPublic:
    """The last ``tail`` lines of the worker's log (stdout, stderr, tracebacks)."""
    await service.get(run_id)
    lines = await asyncio.to_thread(_tail_lines, service.run_dir(run_id) / "worker.log", tail)
    return LogPublic(run_id=run_id, lines=lines)
