"""The first rows of a stored data file, read with bounds on rows and bytes.

:func:`preview_rows` backs the API's preview: it reads only as much of the file as the rows
asked for need, refuses (DATASET_PARSE_FAILED) when those rows would take more than
``max_bytes``, and never raises anything but :class:`BackpropError`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backpropagate.data.readers import (
    MAX_DEPTH,
    csv_field_limit,
    iter_parquet,
    open_parquet,
    parse_json,
    too_deep,
)
from backpropagate.errors import BackpropError, ErrorCode

PREVIEW_MAX_BYTES = 16 * 1024 * 1024
UNPARSED_CHARS = 2000


def _too_big(path: Path, max_bytes: int) -> BackpropError:
    return BackpropError(
        ErrorCode.DATASET_PARSE_FAILED,
        f"{path.name}: the rows asked for take more than {max_bytes // 1024:,} KB; preview fewer rows.",
        file=str(path),
    )


def _too_deep(path: Path) -> BackpropError:
    return BackpropError(
        ErrorCode.DATASET_PARSE_FAILED,
        f"{path.name}: invalid JSON: nested more than {MAX_DEPTH} levels deep",
        file=str(path),
    )


def _lines(path: Path, max_bytes: int) -> Iterator[str]:
    """Lines decoded one by one (bad bytes replaced); more than ``max_bytes`` in all is refused."""
    left = max_bytes
    with path.open("rb") as fh:
        while raw := fh.readline(left + 1):
            left -= len(raw)
            if left < 0:
                raise _too_big(path, max_bytes)
            yield raw.decode("utf-8", errors="replace").removeprefix("\ufeff")


def _jsonl(path: Path, n: int, max_bytes: int) -> list[Any]:
    out: list[Any] = []
    lines = _lines(path, max_bytes)
    while len(out) < n and (line := next(lines, None)) is not None:
        if line.strip():
            try:
                out.append(parse_json(line))
            except ValueError:
                out.append({"_unparsed": line.rstrip("\r\n")[:UNPARSED_CHARS]})
    return out


def _json(path: Path, n: int, max_bytes: int) -> list[Any]:
    """The first ``n`` items of a JSON array (or the object itself), parsed from a bounded prefix."""
    with path.open("rb") as fh:
        head = fh.read(max_bytes + 1)
    text = head.decode("utf-8", errors="replace").removeprefix("\ufeff")
    complete = len(head) <= max_bytes
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos : pos + 1] != "[":
        if not complete:
            raise _too_big(path, max_bytes)
        return [_parse(path, text)]
    out: list[Any] = []
    pos += 1
    while len(out) < n:
        pos = _skip(text, pos, ",")
        if text[pos : pos + 1] in ("]", ""):
            if not text[pos : pos + 1] and not complete:
                raise _too_big(path, max_bytes)
            break
        try:
            item, pos = decoder.raw_decode(text, pos)
        except RecursionError:
            raise _too_deep(path) from None
        except json.JSONDecodeError as exc:
            if not complete:
                raise _too_big(path, max_bytes) from None
            raise BackpropError(
                ErrorCode.DATASET_PARSE_FAILED,
                f"{path.name}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})",
                file=str(path),
                line=exc.lineno,
            ) from None
        if too_deep(item):
            raise _too_deep(path)
        out.append(item)
    return out


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] in chars):
        pos += 1
    return pos


def _parse(path: Path, text: str) -> Any:
    try:
        return parse_json(text)
    except ValueError as exc:
        raise BackpropError(
            ErrorCode.DATASET_PARSE_FAILED, f"{path.name}: invalid JSON: {exc}", file=str(path)
        ) from None


def _csv(path: Path, n: int, max_bytes: int) -> list[Any]:
    csv_field_limit()
    lines = _lines(path, max_bytes)
    reader = csv.DictReader(lines)
    try:
        return [row for _, row in zip(range(n), reader, strict=False)]
    except csv.Error as exc:
        line = reader.reader.line_num or 1  # DictReader.line_num lags on errors
        raise BackpropError(
            ErrorCode.DATASET_PARSE_FAILED, f"{path.name}:{line}: CSV error: {exc}", file=str(path), line=line
        ) from None


def _parquet(path: Path, n: int, max_bytes: int) -> list[Any]:
    pf = open_parquet(path)
    meta = pf.metadata
    if meta.num_row_groups and meta.row_group(0).num_rows:
        first = meta.row_group(0)
        if first.total_byte_size / first.num_rows * min(n, first.num_rows) > max_bytes:
            raise _too_big(path, max_bytes)
    out: list[Any] = []
    size = 0
    for row in iter_parquet(pf, str(path), batch_rows=min(n, 64)):
        size += len(json.dumps(row, default=str))
        if size > max_bytes:
            raise _too_big(path, max_bytes)
        out.append(row)
        if len(out) >= n:
            break
    return out


def preview_rows(path: Path, fmt: str, n: int, max_bytes: int = PREVIEW_MAX_BYTES) -> list[Any]:
    """Up to ``n`` rows of a ``fmt`` file (jsonl, json, csv, txt, parquet) as read, unnormalized."""
    try:
        if fmt == "jsonl":
            return _jsonl(path, n, max_bytes)
        if fmt == "txt":
            lines = _lines(path, max_bytes)
            return [line.rstrip("\r\n") for _, line in zip(range(n), lines, strict=False)]
        if fmt == "csv":
            return _csv(path, n, max_bytes)
        if fmt == "json":
            return _json(path, n, max_bytes)
        if fmt == "parquet":
            return _parquet(path, n, max_bytes)
    except OSError as exc:
        raise BackpropError(
            ErrorCode.DATASET_NOT_FOUND, f"{path.name}: {exc.strerror}", path=str(path)
        ) from None
    return []
