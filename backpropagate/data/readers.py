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


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    src = str(path)
    with path.open("r", encoding="utf-8-sig", errors="strict") as fh:
        lineno = 0
        while True:
            try:
                text = fh.readline()
            except UnicodeDecodeError as exc:
                yield RawRow(src, lineno + 1, None, f"not UTF-8 text ({exc.reason})")
                return
            if not text:
                return
            lineno += 1
            if not text.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(src, lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                yield RawRow(src, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield RawRow(src, lineno, obj)


def _read_text(path: Path) -> Iterator[RawRow]:
    """Plain text: one ``{"text": ...}`` row per paragraph (blocks separated by blank lines)."""
    src = str(path)
    block: list[str] = []
    start = 0
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    for lineno, line in enumerate([*lines, ""], start=1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield RawRow(src, start, {"text": "\n".join(block)})
            block = []


def _read_json(path: Path) -> Iterator[RawRow]:
    src = str(path)
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
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


def _read_csv(path: Path) -> Iterator[RawRow]:
    src = str(path)
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            return
        for row in reader:
            # reader.line_num is the physical line the row ended on (quoted cells may span lines)
            if None in row:
                yield RawRow(src, reader.line_num, None, "more cells than header columns")
                continue
            yield RawRow(src, reader.line_num, {k: _cell(v) for k, v in row.items()})


def _cell(value: Any) -> Any:
    """CSV cells are strings; a cell holding a JSON list (e.g. messages) is decoded."""
    if isinstance(value, str) and value[:1] == "[" and value.rstrip()[-1:] == "]":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    src = str(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for broken files
        raise BackpropError(
            ErrorCode.DATASET_PARSE_FAILED, f"{src}: not a readable Parquet file ({exc})", file=src
        ) from None
    for i, obj in enumerate(table.to_pylist(), start=1):
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
