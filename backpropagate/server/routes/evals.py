"""/api evaluations: start an evaluation job for a run, follow it, and read its results."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from backpropagate.runs.evals import EvalJobs, resolve_eval_data
from backpropagate.server.routes.deps import ServiceDep

router = APIRouter(tags=["evaluations"])


def get_jobs(request: Request) -> EvalJobs:
    state = request.app.state
    if getattr(state, "eval_jobs", None) is None:
        state.eval_jobs = EvalJobs(state.settings)
    return state.eval_jobs


class EvalRequest(BaseModel):
    data: str | None = Field(
        None,
        description='JSONL of {"prompt", "expected"} rows (optional "regex"): an uploaded data set id or a '
        "path inside the allowed folders. Without it, only the held-out loss and perplexity.",
    )
    vs: str | None = Field(
        None, description="Compare with another run id, or `base` (the model without adapter)."
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Longest generated answer.")
    seed: int = Field(0, description="Seed of the bootstrap intervals.")


class EvalError(BaseModel):
    code: str
    message: str
    hint: str | None = None


class EvalStatus(BaseModel):
    id: str
    run_id: str
    data: str | None
    vs: str | None
    created_at: float | None
    status: Literal["running", "completed", "failed"]
    stage: str | None = Field(description="generate:run, loss:run, generate:vs or loss:vs while running.")
    progress: float = Field(description="Fraction done, 0 to 1.")
    error: EvalError | None
    verdict: str | None = Field(description="Better, worse or no clear difference, and on which metrics.")
    result: dict[str, Any] | None = Field(
        description='The object `backprop eval --json` prints: {"run", "vs", "diff", "examples", ...}.'
    )


@router.post("/runs/{run_id}/evals", status_code=202, response_model=EvalStatus)
async def start_eval(run_id: str, body: EvalRequest, service: ServiceDep, request: Request) -> EvalStatus:
    """Evaluate a completed or stopped run in the background; follow it with GET .../evals/{eval_id}."""
    run = await service.get(run_id)
    vs_run = await service.get(body.vs) if body.vs and body.vs != "base" else None
    data = None
    if body.data:
        data = await asyncio.to_thread(resolve_eval_data, body.data, service.settings, service.store)
    state = await asyncio.to_thread(
        get_jobs(request).start,
        run,
        data=data,
        vs=body.vs,
        vs_run=vs_run,
        max_new_tokens=body.max_new_tokens,
        seed=body.seed,
    )
    return EvalStatus.model_validate(state)


@router.get("/runs/{run_id}/evals", response_model=list[EvalStatus])
async def list_evals(run_id: str, service: ServiceDep, request: Request) -> list[EvalStatus]:
    """Every evaluation of a run, oldest first (results left out: GET one to read them)."""
    await service.get(run_id)
    states = await asyncio.to_thread(get_jobs(request).list_for_run, run_id)
    return [EvalStatus.model_validate(s) for s in states]


@router.get("/runs/{run_id}/evals/{eval_id}", response_model=EvalStatus)
async def get_eval(run_id: str, eval_id: str, service: ServiceDep, request: Request) -> EvalStatus:
    await service.get(run_id)
    return EvalStatus.model_validate(await asyncio.to_thread(get_jobs(request).status, run_id, eval_id))
