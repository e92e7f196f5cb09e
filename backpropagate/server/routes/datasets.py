"""/api/datasets: upload training data (allowed types, size limit, generated names), list, check, preview."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from backpropagate.data.preview import preview_rows
from backpropagate.errors import BackpropError, ErrorCode, disk_full_error
from backpropagate.runs.datacheck import check_data
from backpropagate.runs.inputs import resolve_model
from backpropagate.runs.uploads import store_upload, too_large, upload_limit, upload_suffix
from backpropagate.server.routes.deps import ServiceDep, SettingsDep

router = APIRouter(tags=["datasets"])

CHUNK = 1 << 20


class DatasetPublic(BaseModel):
    id: str
    original_name: str
    size: int
    format: str
    rows: int | None
    created_at: float


class PreviewPublic(BaseModel):
    id: str
    rows: list[Any]


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            }
        },
    }
}


@router.post("/datasets", status_code=201, response_model=DatasetPublic, openapi_extra=_UPLOAD_BODY)
async def upload_dataset(request: Request, service: ServiceDep, settings: SettingsDep) -> DatasetPublic:
    """Store an uploaded file under a generated name; refuse other types and files over the limit.

    The body is read as it arrives with a running byte count (chunked bodies too): past the limit
    the request stops with 413 and nothing is kept.
    """
    limit = upload_limit(settings)
    slack = 64 * 1024  # multipart boundaries and part headers
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + slack:
        raise too_large("the upload", settings, int(declared))

    async def body() -> AsyncIterator[bytes]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + slack:
                raise too_large("the upload", settings)
            yield chunk

    parser = MultiPartParser(request.headers, body(), max_files=1, max_fields=10)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BackpropError(
            ErrorCode.INPUT_REQUEST_INVALID, f"The upload is not valid multipart data: {exc}"
        ) from exc
    try:
        file = form.get("file")
        if not isinstance(file, StarletteUploadFile):
            raise BackpropError(
                ErrorCode.INPUT_REQUEST_INVALID, "The upload needs a file field named 'file'."
            )
        original = Path(file.filename or "upload").name
        upload_suffix(original)

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await file.read(CHUNK):
                yield chunk

        try:
            row = await store_upload(service.store, settings, original, chunks())
        except OSError as exc:  # nothing is kept (store_upload removes the partial file)
            full = disk_full_error(exc, settings.datasets_dir)
            if full is None:
                raise
            raise full from exc
    finally:
        await form.close()
    return DatasetPublic.model_validate(row.model_dump())


@router.get("/datasets", response_model=list[DatasetPublic])
async def list_datasets(service: ServiceDep) -> list[DatasetPublic]:
    rows = await asyncio.to_thread(service.store.list_datasets)
    return [DatasetPublic.model_validate(r.model_dump()) for r in rows]


@router.get("/datasets/{dataset_id}/preview", response_model=PreviewPublic)
async def preview_dataset(
    dataset_id: str, service: ServiceDep, rows: int = Query(20, ge=1, le=1000)
) -> PreviewPublic:
    row = await asyncio.to_thread(service.store.get_dataset, dataset_id)
    # Bounded by rows and bytes read; raises only coded errors (a parquet "bomb" is refused unread).
    data = await asyncio.to_thread(preview_rows, Path(row.stored_path), row.format, rows)
    return PreviewPublic(id=dataset_id, rows=data)


@router.get("/datasets/{dataset_id}/validate")
async def validate_dataset(
    dataset_id: str,
    service: ServiceDep,
    settings: SettingsDep,
    model: str = Query("demo", description="Model whose tokenizer counts tokens; `none` to skip."),
    max_seq_len: int = Query(1024, ge=16, le=131072),
) -> dict[str, Any]:
    """The data checker's report (formats, rows, bad rows, token lengths); ``ok`` says if it can train.

    It runs in a subprocess (``runs/datacheck.py``): loading a tokenizer pulls in libraries the
    server process keeps out.
    """
    row = await asyncio.to_thread(service.store.get_dataset, dataset_id)
    if model.lower() != "none":
        model = await asyncio.to_thread(resolve_model, model, settings)
    return await check_data(row.stored_path, model, max_seq_len)
