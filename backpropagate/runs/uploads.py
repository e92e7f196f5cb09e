"""Storing an uploaded data set: allowed types, the size limit, a generated name, a store record.

The one place these rules live; the API's upload route and the web app's upload both call it.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.runs.store import DatasetRow, Store
from backpropagate.settings import Settings

UPLOAD_LIMIT_SETTING = "BACKPROPAGATE_SERVER__MAX_UPLOAD_MB"
ALLOWED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def upload_suffix(filename: str) -> str:
    """The file's allowed type suffix, or INPUT_UPLOAD_TYPE."""
    name = filename.lower()
    suffix = next((s for s in ALLOWED_SUFFIXES if name.endswith(s)), "")
    if not suffix:
        raise BackpropError(
            ErrorCode.INPUT_UPLOAD_TYPE, f"{filename!r} is not a .jsonl, .json, .csv, .parquet or .txt file."
        )
    return suffix


def upload_limit(settings: Settings) -> int:
    return settings.server.max_upload_mb * 1024 * 1024


def too_large(filename: str, settings: Settings, size: int | None = None) -> BackpropError:
    said = f"is {size / 2**20:.1f} MB" if size is not None else "is larger than that"
    return BackpropError(
        ErrorCode.INPUT_UPLOAD_TOO_LARGE,
        f"The upload limit is {settings.server.max_upload_mb} MB and {filename!r} {said}.",
        hint=f"Split the file, or raise {UPLOAD_LIMIT_SETTING} (Settings.server.max_upload_mb) on the server.",
    )


def count_rows(path: Path, fmt: str) -> int | None:
    """Rows in a stored upload (None when the file cannot be read as its type)."""
    try:
        if fmt in ("jsonl", "txt"):
            with path.open("rb") as fh:
                return sum(1 for line in fh if line.strip())
        if fmt == "csv":
            with path.open(newline="", errors="replace") as fh:
                return max(sum(1 for _ in csv.reader(fh)) - 1, 0)
        if fmt == "json":
            data = json.loads(path.read_text())
            return len(data) if isinstance(data, list) else 1
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None
    return None


async def store_upload(
    store: Store, settings: Settings, filename: str, chunks: AsyncIterator[bytes]
) -> DatasetRow:
    """Write ``chunks`` under a generated name in the data folder and record it.

    Nothing is left behind when the type is wrong, the limit is passed or the writer fails.
    """
    original = Path(filename or "upload").name
    suffix = upload_suffix(original)
    limit = upload_limit(settings)
    dataset_id = "ds-" + secrets.token_hex(6)
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    target = settings.datasets_dir / f"{dataset_id}{suffix}"
    size = 0
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise too_large(original, settings)
                await asyncio.to_thread(out.write, chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    fmt = suffix.lstrip(".")
    rows = await asyncio.to_thread(count_rows, target, fmt)
    row = DatasetRow(
        id=dataset_id, original_name=original, stored_path=str(target), size=size, format=fmt, rows=rows
    )
    return await asyncio.to_thread(store.add_dataset, row)
