"""/api exports: start an export job for a run, follow it, download its files, serve and chat with it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from backpropagate.errors import BackpropError
from backpropagate.export.jobs import ExportJobs
from backpropagate.server.routes.deps import ServiceDep


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        jobs = getattr(app.state, "export_jobs", None)
        if jobs is not None:
            await asyncio.to_thread(jobs.close)  # model servers end with the app


router = APIRouter(tags=["exports"], lifespan=lifespan)


def get_jobs(request: Request) -> ExportJobs:
    state = request.app.state
    if getattr(state, "export_jobs", None) is None:
        state.export_jobs = ExportJobs(state.settings)
    return state.export_jobs


class ExportRequest(BaseModel):
    format: Literal["adapter", "merged", "gguf"] = "gguf"
    quantization: str | None = Field(
        None, description="f16, q8_0, q4_k_m, ... (gguf); f32/f16/bf16 (merged)."
    )
    verify: bool = Field(True, description="Compare the GGUF's outputs with the trained model.")
    ollama_name: str | None = Field(None, description="Also register the GGUF with Ollama under this name.")
    base_model: bool = Field(
        False,
        description="Export the model the run started from, without the adapter (gguf only), to chat with "
        "next to the run's export. Made once per quantization: a later request gets the same export.",
    )


class ExportFile(BaseModel):
    name: str
    bytes: int


class ExportError(BaseModel):
    code: str
    message: str
    hint: str | None = None
    details: dict[str, Any] = {}


class ExportStatus(BaseModel):
    id: str
    run_id: str
    format: str
    quantization: str | None
    verify: bool
    ollama_name: str | None
    base_model: bool = Field(False, description="The run's base model, without the adapter.")
    status: Literal["running", "completed", "failed"]
    stage: str | None = Field(description="merge, convert, quantize, verify or ollama while running.")
    progress: float = Field(description="Fraction done, 0 to 1.")
    created_at: float
    ended_at: float | None
    files: list[ExportFile]
    path: str | None
    seconds: float | None
    verification: dict[str, Any] | None
    warnings: list[str]
    error: ExportError | None
    base_url: str | None = Field(description="The model server's URL while this export is served.")


class ServeStatus(BaseModel):
    export_id: str
    base_url: str | None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    export_id: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.7, ge=0.0, le=5.0)


@router.post("/runs/{run_id}/exports", status_code=202, response_model=ExportStatus)
async def start_export(
    run_id: str, body: ExportRequest, service: ServiceDep, request: Request
) -> ExportStatus:
    """Export a completed or stopped run in the background; follow it with GET /api/exports/{id}."""
    run = await service.get(run_id)
    jobs = get_jobs(request)
    state = await asyncio.to_thread(
        jobs.start, run, body.format, body.quantization, body.verify, body.ollama_name, body.base_model
    )
    return ExportStatus.model_validate(state)


@router.get("/exports", response_model=list[ExportStatus])
async def list_exports(run_id: str, service: ServiceDep, request: Request) -> list[ExportStatus]:
    """Every export job of a run (running, completed and failed), oldest first."""
    await service.get(run_id)
    states = await asyncio.to_thread(get_jobs(request).list_for_run, run_id)
    return [ExportStatus.model_validate(s) for s in states]


@router.get("/exports/{export_id}", response_model=ExportStatus)
async def get_export(export_id: str, request: Request) -> ExportStatus:
    return ExportStatus.model_validate(await asyncio.to_thread(get_jobs(request).status, export_id))


@router.delete("/exports/{export_id}", status_code=204)
async def delete_export(export_id: str, service: ServiceDep, request: Request) -> Response:
    """Cancel a running export or remove a finished one: its job, model server, files and record."""
    await asyncio.to_thread(get_jobs(request).delete, export_id, service.store)
    return Response(status_code=204)


@router.get("/exports/{export_id}/download", response_class=FileResponse)
async def download_export_file(
    export_id: str, request: Request, file: str = Query(..., description="One of the export's file names.")
) -> FileResponse:
    path = await asyncio.to_thread(get_jobs(request).file_path, export_id, file)
    return FileResponse(path, filename=path.name, media_type="application/octet-stream")


@router.post("/exports/{export_id}/serve", response_model=ServeStatus)
async def serve_export(export_id: str, request: Request) -> ServeStatus:
    """Start llama.cpp's server for a GGUF export on a loopback port (reused while it runs)."""
    base_url = await asyncio.to_thread(get_jobs(request).serve, export_id)
    return ServeStatus(export_id=export_id, base_url=base_url)


@router.delete("/exports/{export_id}/serve", status_code=204)
async def stop_serving(export_id: str, request: Request) -> Response:
    jobs = get_jobs(request)
    await asyncio.to_thread(jobs.job_dir, export_id)  # 404 for unknown exports
    await asyncio.to_thread(jobs.stop_server, export_id)
    return Response(status_code=204)


def _sse(data: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


@router.post("/chat", response_class=StreamingResponse)
async def chat(body: ChatRequest, request: Request) -> StreamingResponse:
    """Stream a reply from an export's model server as server-sent events.

    Each ``data:`` line is ``{"text": piece}``; the stream ends with ``event: done``, or with
    ``event: error`` and the catalog error. The server is started first if it is not running.
    """
    from backpropagate.export.serve import stream_chat

    base_url = await asyncio.to_thread(get_jobs(request).serve, body.export_id)
    messages = [m.model_dump() for m in body.messages]

    def events() -> Iterator[str]:  # runs in a worker thread (sync iterator)
        try:
            for piece in stream_chat(
                base_url, messages, max_tokens=body.max_tokens, temperature=body.temperature
            ):
                yield _sse({"text": piece})
        except BackpropError as err:
            yield _sse(err.to_dict(), event="error")
            return
        yield _sse({}, event="done")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
