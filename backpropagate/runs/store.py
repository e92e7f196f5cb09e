"""The run store: SQLModel tables for runs, checkpoints, exports and uploaded data sets.

SQLite (WAL) under BACKPROPAGATE_HOME by default, any SQLAlchemy URL through BACKPROPAGATE_DB_URL
(PostgreSQL with the ``postgres`` extra: several servers may share one database). Writes that read
the row first lock it (``SELECT ... FOR UPDATE`` where the database has it), and the schema is
migrated under a database-wide lock, so two processes never fold the same event twice or race a
migration. It is a cache of the event logs: ``reindex`` rebuilds runs and checkpoints from
``runs/<id>/``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import String, TypeDecorator, inspect, text
from sqlalchemy import event as sa_event
from sqlalchemy.exc import OperationalError
from sqlmodel import JSON, Column, Field, Session, SQLModel, create_engine, select

from backpropagate import events
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import Checkpoint, EventBase, RunStatus, read_events
from backpropagate.runs.fold import fold_summary

# The status sets live with the event schema; re-exported for the store's callers.
ACTIVE_STATUSES = events.ACTIVE_STATUSES
RESUMABLE_STATUSES = events.RESUMABLE_STATUSES

SCHEMA_VERSION = 2


class StatusColumn(TypeDecorator):
    """A RunStatus stored as its plain value ("queued"): a database written before the enum reads the same."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else RunStatus(value).value

    def process_result_value(self, value: Any, dialect: Any) -> RunStatus | None:
        return None if value is None else RunStatus(value)


class Run(SQLModel, table=True):
    __tablename__ = "runs"

    id: str = Field(primary_key=True)
    name: str | None = None
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    status: RunStatus = Field(default=RunStatus.QUEUED, sa_type=StatusColumn, index=True)
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    pid: int | None = None
    gpus: list[int] = Field(default_factory=list, sa_column=Column(JSON))
    exit_code: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    final_metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    last_seq: int = 0
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    queued_reason: str | None = None  # what a queued run waits for (set by the scheduler)


class CheckpointRow(SQLModel, table=True):
    __tablename__ = "checkpoints"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    step: int
    path: str
    bytes: int = 0
    best: bool = False
    created_at: float = Field(default_factory=time.time)


class ExportRow(SQLModel, table=True):
    __tablename__ = "exports"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    format: str
    path: str
    bytes: int = 0
    created_at: float = Field(default_factory=time.time)


class DatasetRow(SQLModel, table=True):
    __tablename__ = "datasets"

    id: str = Field(primary_key=True)
    original_name: str
    stored_path: str
    size: int
    format: str
    rows: int | None = None
    created_at: float = Field(default_factory=time.time)


class SchemaVersion(SQLModel, table=True):
    __tablename__ = "schema_version"

    version: int = Field(primary_key=True)
    applied_at: float = Field(default_factory=time.time)


# Each migration takes the store from version N-1 to N; each must be safe to run twice. Version 1
# is the tables as first declared; a new column is created with the table in a new database, so
# its ADD COLUMN only runs where the column is missing.
MIGRATIONS: dict[int, list[str]] = {
    1: [],
    2: ["ALTER TABLE runs ADD COLUMN queued_reason VARCHAR"],
}
_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", re.I)
_MIGRATION_LOCK_KEY = 0x6270726F70  # "bprop": the advisory lock that serializes migrations


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` as people paste them, on the driver that is installed.

    SQLAlchemy reads a bare ``postgresql://`` as psycopg2; the ``postgres`` extra installs psycopg 3.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgres", "postgresql"):
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return f"postgresql+psycopg://{rest}"
        return f"postgresql://{rest}"
    return url


def apply_event(run: Run, event: EventBase) -> CheckpointRow | None:
    """Fold one event into a run row (the one reducer, runs/fold.py); a checkpoint's row to add."""
    fold_summary(run, event)
    if not isinstance(event, Checkpoint):
        return None
    return CheckpointRow(
        run_id=run.id,
        step=event.step,
        path=event.path,
        bytes=event.bytes,
        best=event.best,
        created_at=event.ts,
    )


class Store:
    """Synchronous access to the tables; the server calls it from worker threads."""

    def __init__(self, url: str) -> None:
        url = normalize_url(url)
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True  # a database server restarted under us: reconnect
        try:
            self.engine = create_engine(url, **kwargs)
        except ModuleNotFoundError as exc:
            raise BackpropError(
                ErrorCode.DEP_EXTRA_MISSING,
                f"The database driver {exc.name!r} for BACKPROPAGATE_DB_URL is not installed.",
                hint="For PostgreSQL: pip install -e '.[postgres]' (psycopg 3), "
                "and write the URL as postgresql+psycopg://user:password@host/db.",
            ) from None
        if url.startswith("sqlite"):
            sa_event.listen(self.engine, "connect", _sqlite_pragmas)
        self.migrate()

    # Schema -------------------------------------------------------------------
    def migrate(self) -> int:
        try:
            connection = self.engine.connect()
        except OperationalError as exc:  # the first connection: a wrong URL or a server that is down
            raise _unreachable(self.engine.url, exc) from None
        with connection as con:
            if self.engine.dialect.name == "postgresql":
                # Two servers starting on one new database would race CREATE TABLE (and the
                # version rows); the lock is the database's, released with this connection.
                con.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            try:
                self._migrate()
            finally:
                if self.engine.dialect.name == "postgresql":
                    con.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                    con.commit()
        return self.schema_version()

    def _migrate(self) -> None:
        SQLModel.metadata.create_all(self.engine)
        with Session(self.engine) as s:
            have = {row.version for row in s.exec(select(SchemaVersion))}
            for version in sorted(MIGRATIONS):
                if version in have:
                    continue
                for statement in MIGRATIONS[version]:
                    added = _ADD_COLUMN.match(statement)
                    if added and added[2] in {c["name"] for c in inspect(self.engine).get_columns(added[1])}:
                        continue
                    s.exec(text(statement))  # type: ignore[call-overload]
                s.add(SchemaVersion(version=version))
                s.commit()

    def schema_version(self) -> int:
        with Session(self.engine) as s:
            return max((row.version for row in s.exec(select(SchemaVersion))), default=0)

    # Runs ---------------------------------------------------------------------
    def add_run(self, run: Run) -> Run:
        with Session(self.engine, expire_on_commit=False) as s:
            s.add(run)
            s.commit()
            return run

    def get_run(self, run_id: str) -> Run:
        with Session(self.engine, expire_on_commit=False) as s:
            run = s.get(Run, run_id)
        if run is None:
            raise BackpropError(ErrorCode.STATE_RUN_NOT_FOUND, f"No run with id {run_id!r}.")
        return run

    def find_run(self, run_id: str) -> Run | None:
        with Session(self.engine, expire_on_commit=False) as s:
            return s.get(Run, run_id)

    def list_runs(self, status: Iterable[str] | None = None, limit: int = 1000) -> list[Run]:
        with Session(self.engine, expire_on_commit=False) as s:
            query = select(Run).order_by(Run.created_at.desc()).limit(limit)  # type: ignore[attr-defined]
            if status:
                query = query.where(Run.status.in_(list(status)))  # type: ignore[attr-defined]
            return list(s.exec(query))

    def update_run(self, run_id: str, **fields: Any) -> Run:
        with Session(self.engine, expire_on_commit=False) as s:
            run = s.get(Run, run_id, with_for_update=True)
            if run is None:
                raise BackpropError(ErrorCode.STATE_RUN_NOT_FOUND, f"No run with id {run_id!r}.")
            for key, value in fields.items():
                setattr(run, key, value)
            s.add(run)
            s.commit()
            return run

    def apply_events(self, run_id: str, events: list[EventBase]) -> Run:
        """Fold a batch of new events (seq > last_seq) into the run, in one transaction.

        The row is locked while it is read and written: another process folding the same log
        waits, then sees the new ``last_seq`` and skips what was already folded.
        """
        with Session(self.engine, expire_on_commit=False) as s:
            run = s.get(Run, run_id, with_for_update=True)
            if run is None:
                raise BackpropError(ErrorCode.STATE_RUN_NOT_FOUND, f"No run with id {run_id!r}.")
            for event in events:
                if event.seq <= run.last_seq:
                    continue
                checkpoint = apply_event(run, event)
                if checkpoint is not None:
                    s.add(checkpoint)
            s.add(run)
            s.commit()
            return run

    def delete_run(self, run_id: str) -> None:
        with Session(self.engine) as s:
            for table in (CheckpointRow, ExportRow):
                for row in s.exec(select(table).where(table.run_id == run_id)):
                    s.delete(row)
            run = s.get(Run, run_id)
            if run is not None:
                s.delete(run)
            s.commit()

    def checkpoints(self, run_id: str) -> list[CheckpointRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            query = select(CheckpointRow).where(CheckpointRow.run_id == run_id).order_by(CheckpointRow.step)
            return list(s.exec(query))

    # Exports ------------------------------------------------------------------
    def add_export(self, row: ExportRow) -> ExportRow:
        with Session(self.engine, expire_on_commit=False) as s:
            s.add(row)
            s.commit()
            return row

    def exports(self, run_id: str) -> list[ExportRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            query = select(ExportRow).where(ExportRow.run_id == run_id).order_by(ExportRow.created_at)
            return list(s.exec(query))

    def delete_exports(self, run_id: str, folder: str) -> int:
        """Forget the run's exports stored in ``folder`` (or that are it); returns how many."""
        prefix = folder.rstrip("/") + "/"
        with Session(self.engine) as s:
            rows = [
                r
                for r in s.exec(select(ExportRow).where(ExportRow.run_id == run_id))
                if r.path == folder or r.path.startswith(prefix)
            ]
            for row in rows:
                s.delete(row)
            s.commit()
            return len(rows)

    # Data sets ----------------------------------------------------------------
    def add_dataset(self, row: DatasetRow) -> DatasetRow:
        with Session(self.engine, expire_on_commit=False) as s:
            s.add(row)
            s.commit()
            return row

    def get_dataset(self, dataset_id: str) -> DatasetRow:
        with Session(self.engine, expire_on_commit=False) as s:
            row = s.get(DatasetRow, dataset_id)
        if row is None:
            raise BackpropError(ErrorCode.DATASET_NOT_FOUND, f"No uploaded data set with id {dataset_id!r}.")
        return row

    def find_dataset(self, dataset_id: str) -> DatasetRow | None:
        with Session(self.engine, expire_on_commit=False) as s:
            return s.get(DatasetRow, dataset_id)

    def list_datasets(self) -> list[DatasetRow]:
        with Session(self.engine, expire_on_commit=False) as s:
            return list(s.exec(select(DatasetRow).order_by(DatasetRow.created_at.desc())))  # type: ignore[attr-defined]

    # Rebuilding from disk -------------------------------------------------------
    def reindex(self, runs_dir: Path) -> int:
        """Rebuild every run and its checkpoints from ``runs_dir/<id>/``; returns the number of runs."""
        count = 0
        for run_dir in sorted(p for p in Path(runs_dir).iterdir() if p.is_dir()):
            config_path = run_dir / "config.json"
            if not config_path.exists():
                continue
            config = json.loads(config_path.read_text())
            meta = _read_meta(run_dir)
            run = Run(
                id=run_dir.name,
                name=config.get("name"),
                config=config,
                status="queued",
                created_at=meta.get("created_at") or config_path.stat().st_mtime,
            )
            checkpoints: list[CheckpointRow] = []
            events = list(read_events(run_dir / "events.jsonl"))
            for event in events:
                row = apply_event(run, event)
                if row is not None:
                    checkpoints.append(row)
            if run.status in ("running", "paused") and not _worker_alive(run, run_dir):
                run.status = "interrupted"
                run.error_code = str(ErrorCode.RUNTIME_WORKER_CRASHED)
                run.error_message = "The event log ends without a final event."
            with Session(self.engine) as s:
                for table in (CheckpointRow,):
                    for old in s.exec(select(table).where(table.run_id == run.id)):
                        s.delete(old)
                existing = s.get(Run, run.id)
                if existing is not None:
                    s.delete(existing)
                    s.flush()
                s.add(run)
                for row in checkpoints:
                    s.add(row)
                s.commit()
            count += 1
        return count


def _unreachable(url: Any, exc: OperationalError) -> BackpropError:
    said = str(exc.orig or exc).strip()
    reason = said.splitlines()[0] if said else type(exc).__name__
    shown = url.render_as_string(hide_password=True)  # the password never reaches a message or a log
    return BackpropError(
        ErrorCode.CONFIG_INVALID_SETTING,
        f"Cannot reach the run store's database {shown}: {reason}",
        hint="Check BACKPROPAGATE_DB_URL (host, port, database, user) and that the database server is running.",
    )


def _worker_alive(run: Run, run_dir: Path) -> bool:
    from backpropagate.runs.liveness import run_alive

    return run_alive(run.pid, Path(run_dir).resolve())


def _read_meta(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def open_store(url: str | None = None) -> Store:
    """The store at ``url`` (default: the settings' database URL)."""
    from backpropagate.settings import get_settings

    return Store(url or get_settings().database_url)
