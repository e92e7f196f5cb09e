"""Chat ratings as training data: pairs for DPO and rated replies for KTO, appended safely.

The Chat page marks the better of two replies (a pair) or rates one reply up or down (a KTO row).
Each kind goes to its own JSONL file in the uploads folder, registered in the store like any
upload, so the New run page lists it. Appends hold an exclusive lock on the file, write one line
with one ``write`` on an ``O_APPEND`` descriptor and fsync before returning: two tabs appending at
once lose nothing, and a crash can at worst leave one torn last line, which the next append cuts
off before writing (that rating was never confirmed to the user).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from sqlmodel import Session

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.runs.store import DatasetRow, Store
from backpropagate.settings import Settings

Kind = Literal["pairs", "kto"]
# The names the New run page lists them under (the stored files get generated names, as uploads do).
NAMES: dict[Kind, str] = {"pairs": "chat-ratings.jsonl", "kto": "chat-ratings-kto.jsonl"}
OBJECTIVE: dict[Kind, str] = {"pairs": "dpo", "kto": "kto"}


def pair_row(
    prompt: list[dict[str, str]], chosen: str, rejected: str, chosen_export: str, rejected_export: str
) -> dict[str, Any]:
    """A preference pair: the conversation so far (ending with the user's turn) and both replies."""
    _check(prompt, chosen, rejected)
    row = {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_export": chosen_export,
        "rejected_export": rejected_export,
    }
    return _valid(row, "preference")


def kto_row(prompt: list[dict[str, str]], completion: str, label: bool, export: str) -> dict[str, Any]:
    """A rated reply: ``label`` true for a reply the user wants more of."""
    _check(prompt, completion)
    return _valid({"prompt": prompt, "completion": completion, "label": bool(label), "export": export}, "kto")


def _check(prompt: list[dict[str, str]], *replies: str) -> None:
    # The loaders refuse these rows; refusing them here keeps the file trainable.
    if not prompt or prompt[-1].get("role") != "user":
        raise BackpropError(
            ErrorCode.INPUT_REQUEST_INVALID, "A rating needs a conversation ending with a message."
        )
    if any(not r.strip() for r in replies):
        raise BackpropError(ErrorCode.INPUT_REQUEST_INVALID, "An empty reply cannot be rated.")


def _valid(row: dict[str, Any], fmt: Literal["preference", "kto"]) -> dict[str, Any]:
    """The row, once the data loaders' own rules accept it: the file never holds a row they refuse."""
    from backpropagate.data.formats import RowError, normalize

    try:
        normalize(row, fmt, NAMES["pairs" if fmt == "preference" else "kto"], 0)
    except RowError as exc:
        raise BackpropError(
            ErrorCode.INPUT_REQUEST_INVALID, f"This rating cannot be trained on: {exc}."
        ) from None
    return row


@contextmanager
def _locked(path: Path, flags: int) -> Iterator[int]:
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another tab or process waits here; released on close
        yield fd
    finally:
        os.close(fd)


def append_row(path: Path, row: Mapping[str, Any]) -> int:
    """Append one JSON line durably; returns the file's rows after it."""
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    with _locked(path, os.O_RDWR | os.O_APPEND | os.O_CREAT) as fd:
        size = os.fstat(fd).st_size
        if size:
            data = os.pread(fd, size, 0)
            keep = data.rfind(b"\n") + 1
            if keep < size:  # a torn line from a crash mid-write: drop it so this row starts clean
                os.ftruncate(fd, keep)
                data = data[:keep]
            rows = data.count(b"\n")
        else:
            rows = 0
        view = memoryview(line)
        while view:  # one write in practice; a short write continues under the same lock
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    return rows + 1


def count_rows(path: Path) -> int:
    """Whole lines in a ratings file (a torn last line does not count)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def find_dataset(store: Store, settings: Settings, kind: Kind) -> DatasetRow | None:
    """The ratings data set of ``kind`` in this home, if one has been started."""
    base = settings.datasets_dir.expanduser().resolve()
    for row in store.list_datasets():
        path = Path(row.stored_path)
        if row.original_name == NAMES[kind] and path.parent.resolve() == base and path.exists():
            return row
    return None


def _dataset(store: Store, settings: Settings, kind: Kind) -> DatasetRow:
    """Find or start the ratings data set; creation is serialized so two tabs share one file."""
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    with _locked(settings.datasets_dir / ".chat-ratings.lock", os.O_RDWR | os.O_CREAT):
        row = find_dataset(store, settings, kind)
        if row is not None:
            return row
        dataset_id = "ds-" + secrets.token_hex(6)  # generated like every upload's name
        target = settings.datasets_dir / f"{dataset_id}.jsonl"
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return store.add_dataset(
            DatasetRow(
                id=dataset_id,
                original_name=NAMES[kind],
                stored_path=str(target),
                size=0,
                format="jsonl",
                rows=0,
            )
        )


def add_rating(store: Store, settings: Settings, kind: Kind, row: Mapping[str, Any]) -> DatasetRow:
    """Append a rating to its data set (started on the first one) and return the updated record."""
    dataset = _dataset(store, settings, kind)
    path = Path(dataset.stored_path)
    rows = append_row(path, row)
    # The file grows after it was registered: keep the listed size and row count current.
    with Session(store.engine, expire_on_commit=False) as s:
        current = s.get(DatasetRow, dataset.id)
        if current is not None:
            current.rows, current.size = max(rows, current.rows or 0), path.stat().st_size
            s.add(current)
            s.commit()
            dataset = current
    return dataset


def summary(store: Store, settings: Settings) -> dict[Kind, dict[str, Any]]:
    """Each started ratings data set: its id and rows, read from the file itself."""
    out: dict[Kind, dict[str, Any]] = {}
    kinds: tuple[Kind, ...] = ("pairs", "kto")
    for kind in kinds:
        row = find_dataset(store, settings, kind)
        if row is not None:
            out[kind] = {"id": row.id, "rows": count_rows(Path(row.stored_path))}
    return out
