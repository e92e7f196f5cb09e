"""Read raw rows from data files (JSONL, JSON, CSV, Parquet), folders and `datasets` sources.

Every row keeps its provenance (file and 1-based line or row number) so that an error can point
at the exact place to fix. Rows that cannot even be parsed (invalid JSON on one line) come back
as :class:`RawRow` with ``error`` set instead of raising, so callers decide whether to fail or skip.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")

# Nesting deeper than this is refused per row: deeper values only crash later steps.
MAX_DEPTH = 100
# The most uncompressed bytes one Parquet row group may declare before it is read.
MAX_ROW_GROUP_BYTES = 1 << 30
BATCH_ROWS = 1024


@dataclass
class RawRow:
    """One record as read from its source, before format detection."""

    source: str
    line: int
    record: dict[str, Any] | None
    error: str | None = None


def list_files(path: str | Path) -> list[Path]:
    """The data files a path names: the file itself, or the supported files of a folder, sorted."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise BackpropError(
                ErrorCode.DATASET_NOT_FOUND,
                f"Folder {p} holds no data files (looked for {', '.join(SUFFIXES)}).",
            )
        return files
    raise BackpropError(ErrorCode.DATASET_NOT_FOUND, f"No file or folder at {p}.", path=str(p))


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' ``save_to_disk`` (single split or a DatasetDict)."""
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


def resolve_data_path(name: str | Path) -> Path:
    """A path as given, or an uploaded data set's folder under BACKPROPAGATE_HOME/datasets."""
    p = Path(name).expanduser()
    if p.exists() or p.is_absolute():
        return p
    from backpropagate.settings import get_settings

    uploaded = get_settings().datasets_dir / str(name)
    return uploaded if uploaded.exists() and ".." not in p.parts else p


def read_source(path: str | Path) -> Iterator[tuple[str, Iterator[RawRow]]]:
    """Yield ``(source name, rows)`` per file of a path, uploaded or saved data set, or hub id."""
    p = resolve_data_path(path)
    if is_saved_dataset(p):
        yield str(p), _read_saved_dataset(p)
        return
    if not p.exists() and _looks_like_hub_id(str(path)):
        yield str(path), _read_hub_dataset(str(path))
        return
    for file in list_files(p):
        yield str(file), read_file(file)


def read_file(path: Path) -> Iterator[RawRow]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_text(path)
    if suffix == ".jsonl" or (suffix == ".json" and _first_char(path) not in "[{"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise BackpropError(
        ErrorCode.DATASET_FORMAT_UNSUPPORTED,
        f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv or .parquet.",
    )


def _first_char(path: Path) -> str:
    with path.open("r", encoding="utf-8-sig", errors="replace") as fh:
        while ch := fh.read(1):
            if not ch.isspace():
                return ch
    return ""


def _decode(raw: bytes, first: bool) -> str:
    """One line of bytes as text (a BOM at the start of the file is dropped)."""
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.decode("utf-8")


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line)"


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether lists and objects in ``value`` nest deeper than ``limit`` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def parse_json(text: str) -> Any:
    """``json.loads`` whose only failure is ValueError (too deep raises ValueError too)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    if too_deep(value):
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    return value


def _json_row(src: str, lineno: int, text: str) -> RawRow:
    try:
        obj = parse_json(text)
    except json.JSONDecodeError as exc:
        return RawRow(src, lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})")
    except ValueError as exc:
        return RawRow(src, lineno, None, f"invalid JSON: {exc}")
    if not isinstance(obj, dict):
        return RawRow(src, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
    return RawRow(src, lineno, obj)


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    """One row per non-blank line; each line is decoded on its own, so a bad byte costs one row."""
    src = str(path)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = _decode(raw, lineno == 1)
            except UnicodeDecodeError as exc:
                yield RawRow(src, lineno, None, _not_utf8(exc))
                continue
            if text.strip():  # blank lines (often a trailing newline) are not rows
                yield _json_row(src, lineno, text)


def _read_text(path: Path) -> Iterator[RawRow]:
    """Plain text: one ``{"text": ...}`` row per paragraph (blocks separated by blank lines).

    A line that is not UTF-8 makes its paragraph a bad row named by that line.
    """
    src = str(path)
    block: list[str] = []
    start = 0
    bad: RawRow | None = None
    with path.open("rb") as fh:
        numbered = enumerate(fh, start=1)
        for lineno, raw in [*numbered, (0, b"")]:
            try:
                line = _decode(raw, lineno == 1)
            except UnicodeDecodeError as exc:
                bad = bad or RawRow(src, lineno, None, _not_utf8(exc))
                line = "?"
            if line.strip():
                if not block:
                    start = lineno
                block.append(line.rstrip("\r\n"))
            elif block:
                yield bad or RawRow(src, start, {"text": "\n".join(block)})
                block, bad = [], None


def _read_json(path: Path) -> Iterator[RawRow]:
    src = str(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BackpropError(
            ErrorCode.DATASET_PARSE_FAILED,
            f"{src}:{line}: not UTF-8 text ({exc.reason})",
            file=src,
            line=line,
        ) from None
    try:
        data = parse_json(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            # JSON Lines saved with a .json name: read it line by line for per-line errors.
            yield from _read_jsonl(path)
            return
        raise BackpropError(
            ErrorCode.DATASET_PARSE_FAILED,
            f"{src}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})",
            file=src,
            line=exc.lineno,
        ) from None
    except ValueError as exc:
        raise BackpropError(ErrorCode.DATASET_PARSE_FAILED, f"{src}: invalid JSON: {exc}", file=src) from None
    if isinstance(data, dict):
        rows = next((data[k] for k in ("data", "rows", "train") if isinstance(data.get(k), list)), None)
        if rows is None:
            rows = [data]  # a single example written as one object
    elif isinstance(data, list):
        rows = data
    else:
        raise BackpropError(
            ErrorCode.DATASET_FORMAT_UNSUPPORTED,
            f"{src}: expected a JSON array of rows or an object with a 'data' array, "
            f"got {type(data).__name__}.",
        )
    # A JSON array has no useful line numbers; report the 1-based row index instead.
    for i, obj in enumerate(rows, start=1):
        if isinstance(obj, dict):
            yield RawRow(src, i, obj)
        else:
            yield RawRow(src, i, None, f"expected a JSON object, got {type(obj).__name__}")


def csv_field_limit() -> int:
    """Let one CSV cell be as large as an upload may be (the csv module's default is 128 KiB)."""
    from backpropagate.settings import get_settings

    limit = get_settings().server.max_upload_mb * 1024 * 1024
    csv.field_size_limit(max(limit, 131072))
    return limit


def _csv_lines(fh: Any, bad: dict[int, str]) -> Iterator[str]:
    """Decoded physical lines; a line that is not UTF-8 is noted in ``bad`` and read as replaced."""
    for lineno, raw in enumerate(fh, start=1):
        try:
            yield _decode(raw, lineno == 1)
        except UnicodeDecodeError as exc:
            bad[lineno] = _not_utf8(exc)
            yield raw.decode("utf-8", errors="replace")


def _read_csv(path: Path) -> Iterator[RawRow]:
    src = str(path)
    csv_field_limit()
    bad: dict[int, str] = {}
    with path.open("rb") as fh:
        reader = csv.DictReader(_csv_lines(fh, bad))
        previous = 0
        try:
            if not reader.fieldnames:
                return
            if bad:
                line = min(bad)
                raise BackpropError(
                    ErrorCode.DATASET_PARSE_FAILED,
                    f"{src}:{line}: header {bad[line]}",
                    file=src,
                    line=line,
                )
            previous = reader.line_num
            for row in reader:
                # reader.line_num is the physical line the row ended on (quoted cells may span lines)
                spanned = [n for n in bad if previous < n <= reader.line_num]
                previous = reader.line_num
                if spanned:
                    yield RawRow(src, spanned[0], None, bad[spanned[0]])
                elif None in row:
                    yield RawRow(src, reader.line_num, None, "more cells than header columns")
                else:
                    yield RawRow(src, reader.line_num, {k: _cell(v) for k, v in row.items()})
        except csv.Error as exc:
            line = reader.reader.line_num or 1  # DictReader.line_num lags on errors
            raise BackpropError(
                ErrorCode.DATASET_PARSE_FAILED, f"{src}:{line}: CSV error: {exc}", file=src, line=line
            ) from None


def _cell(value: Any) -> Any:
    """CSV cells are strings; a cell holding a JSON list (e.g. messages) is decoded."""
    if isinstance(value, str) and value[:1] == "[" and value.rstrip()[-1:] == "]":
        try:
            return parse_json(value)
        except ValueError:
            return value
    return value


def open_parquet(path: Path, max_row_group_bytes: int = MAX_ROW_GROUP_BYTES) -> Any:
    """A ``pyarrow.parquet.ParquetFile`` whose row groups all declare at most ``max_row_group_bytes``."""
    import pyarrow.parquet as pq

    src = str(path)
    try:
        pf = pq.ParquetFile(path)
        sizes = [pf.metadata.row_group(i).total_byte_size for i in range(pf.metadata.num_row_groups)]
    except Exception as exc:  # pyarrow raises several unrelated types for broken files
        raise BackpropError(
            ErrorCode.DATASET_PARSE_FAILED, f"{src}: not a readable Parquet file ({exc})", file=src
        ) from None
    for i, size in enumerate(sizes):
        if size > max_row_group_bytes:
            raise BackpropError(
                ErrorCode.DATASET_PARSE_FAILED,
                f"{src}: row group {i + 1} unpacks to {size / 2**20:.0f} MB, over the "
                f"{max_row_group_bytes / 2**20:.0f} MB limit; write it with smaller row groups.",
                file=src,
            )
    return pf


def iter_parquet(pf: Any, src: str, batch_rows: int = BATCH_ROWS) -> Iterator[dict[str, Any]]:
    """The rows of an open Parquet file, decoded a small batch at a time."""
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            yield from batch.to_pylist()
    except Exception as exc:  # truncated pages and bad encodings surface as several types
        raise BackpropError(
            ErrorCode.DATASET_PARSE_FAILED, f"{src}: not a readable Parquet file ({exc})", file=src
        ) from None


def _read_parquet(path: Path) -> Iterator[RawRow]:
    src = str(path)
    pf = open_parquet(path, MAX_ROW_GROUP_BYTES)
    for i, obj in enumerate(iter_parquet(pf, src), start=1):
        yield RawRow(src, i, obj)


def _read_saved_dataset(path: Path) -> Iterator[RawRow]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    for i, obj in enumerate(ds, start=1):
        yield RawRow(str(path), i, dict(obj))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "/", "~"))
        and not name.lower().endswith(SUFFIXES)
    )


def _read_hub_dataset(name: str) -> Iterator[RawRow]:
    from backpropagate.settings import get_settings

    if get_settings().offline:
        raise BackpropError(
            ErrorCode.DATASET_NOT_FOUND,
            f"{name!r} is not a local file or folder, and hub data sets are off (BACKPROPAGATE_OFFLINE).",
            path=name,
        )
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split="train")
    except Exception as exc:  # offline, missing or gated: all mean "not found" to the user
        raise BackpropError(
            ErrorCode.DATASET_NOT_FOUND,
            f"Could not load hub data set {name!r}: {type(exc).__name__}: {exc}",
            path=name,
        ) from None
    for i, obj in enumerate(ds, start=1):
        yield RawRow(name, i, dict(obj))
