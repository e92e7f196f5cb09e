"""The run store on a real PostgreSQL server: the store's own tests, migrations and two processes at once.

A throwaway cluster is made with Debian's ``postgresql`` package (``initdb`` and ``pg_ctl``, also
found under /usr/lib/postgresql/*/bin) in a temp folder on a free port; each test gets its own
database. Where the server or the psycopg driver is missing the tests skip, saying which.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_runs_store as sqlite_suite

from backpropagate.errors import BackpropError
from backpropagate.events import Checkpoint, RunStarted, Step
from backpropagate.runs.store import SCHEMA_VERSION, Run, Store

pytestmark = pytest.mark.slow

psycopg = pytest.importorskip("psycopg", reason="the psycopg driver is missing: pip install -e '.[postgres]'")


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL cluster for this session; yields its base URL (no database name)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl): apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="backprop-pg-"))
    data = folder / "data"
    # The server refuses to run as root: run it as `nobody` there.
    prefix: list[str] = []
    if os.getuid() == 0:
        runuser = shutil.which("runuser")
        if not runuser:
            pytest.skip("running as root without runuser: PostgreSQL cannot be started as root")
        prefix = [runuser, "-u", "nobody", "--"]
        shutil.chown(folder, "nobody")
        folder.chmod(0o700)
    port = _free_port()
    log = folder / "server.log"

    def sh(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    try:
        sh(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        sh(pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')[-2000:]}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


_databases = iter(range(1, 10_000))


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """The URL of a fresh, empty database on the session's server."""
    name = f"store_{next(_databases)}_{os.getpid()}"
    with psycopg.connect(f"{pg_server.replace('+psycopg', '')}/postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return f"{pg_server}/{name}"


@pytest.fixture
def store(pg_url: str) -> Iterator[Store]:
    s = Store(pg_url)
    yield s
    s.engine.dispose()


# The SQLite suite's behaviour tests, run again here against PostgreSQL (its `store` fixture
# is replaced by the one above). Its WAL check is SQLite's own and stays there.
test_events_fold_into_the_run_row = sqlite_suite.test_events_fold_into_the_run_row
test_failed_event_records_code = sqlite_suite.test_failed_event_records_code
test_unknown_run_raises_catalog_error = sqlite_suite.test_unknown_run_raises_catalog_error
test_reindex_rebuilds_runs_and_checkpoints_from_logs = (
    sqlite_suite.test_reindex_rebuilds_runs_and_checkpoints_from_logs
)
test_exports_are_recorded_per_run_and_deleted_with_it = (
    sqlite_suite.test_exports_are_recorded_per_run_and_deleted_with_it
)
test_reindex_keeps_a_live_worker_running = sqlite_suite.test_reindex_keeps_a_live_worker_running


def test_schema_and_migrations_are_idempotent(store: Store, pg_url: str) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    assert store.migrate() == SCHEMA_VERSION and Store(pg_url).migrate() == SCHEMA_VERSION
    with psycopg.connect(pg_url.replace("+psycopg", "")) as con:
        tables = {r[0] for r in con.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"runs", "checkpoints", "exports", "datasets", "schema_version"} <= tables
        assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


def test_a_version_1_database_is_migrated(pg_url: str) -> None:
    """A database made before `queued_reason` existed gains the column and keeps its rows."""
    Store(pg_url).engine.dispose()
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as con:
        con.execute("ALTER TABLE runs DROP COLUMN queued_reason")
        con.execute("DELETE FROM schema_version WHERE version = 2")
        con.execute("INSERT INTO runs (id, config, status, created_at, last_seq, step, gpus, final_metrics) "
                    "VALUES ('old', '{}', 'completed', 1.0, 0, 3, '[]', '{}')")  # fmt: skip
    store = Store(pg_url)
    assert store.schema_version() == SCHEMA_VERSION
    old = store.get_run("old")
    assert (old.status, old.step, old.queued_reason) == ("completed", 3, None)
    store.update_run("old", queued_reason="waiting")
    assert store.get_run("old").queued_reason == "waiting"


def test_runs_list_by_status_and_move_through_their_statuses(store: Store) -> None:
    for i, status in enumerate(["queued", "running", "completed", "cancelled"]):
        store.add_run(Run(id=f"r{i}", status=status, created_at=float(i)))
    assert [r.id for r in store.list_runs()] == ["r3", "r2", "r1", "r0"]
    assert [r.id for r in store.list_runs(["queued", "running"])] == ["r1", "r0"]
    store.update_run("r0", status="running", pid=7)
    store.update_run("r0", status="cancelled", ended_at=5.0)
    assert store.get_run("r0").status == "cancelled" and store.list_runs(["queued"]) == []
    store.delete_run("r0")
    assert store.find_run("r0") is None and len(store.list_runs()) == 3


def _start_together(url: str, barrier_at: float) -> int:
    store = Store(url)  # every process migrates at once on a fresh database
    time.sleep(max(0.0, barrier_at - time.time()))
    return store.schema_version()


def _fold(url: str, run_id: str, barrier_at: float) -> None:
    """Fold the same event log into the run in small batches, as a second server would."""
    store = Store(url)
    events = []
    for seq in range(1, 61):
        if seq % 3 == 0:
            events.append(
                Checkpoint(step=seq, path=f"/c/{seq}", bytes=1, run_id=run_id, seq=seq, ts=float(seq))
            )
        else:
            events.append(
                Step(step=seq, total_steps=60, epoch=0.0, loss=1.0, lr=1e-4, run_id=run_id, seq=seq, ts=1.0)
            )
    time.sleep(max(0.0, barrier_at - time.time()))
    for start in range(0, len(events), 4):
        store.apply_events(run_id, events[start : start + 4])
    store.engine.dispose()


def _touch(url: str, run_id: str, field: str, barrier_at: float) -> None:
    store = Store(url)
    time.sleep(max(0.0, barrier_at - time.time()))
    for i in range(40):
        store.update_run(run_id, **{field: i})
    store.engine.dispose()


def test_two_processes_migrate_and_update_one_database_at_once(pg_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        at = time.time() + 3.0
        assert (
            pool.starmap(_start_together, [(pg_url, at), (pg_url, at)], chunksize=1) == [SCHEMA_VERSION] * 2
        )
        store = Store(pg_url)
        store.add_run(Run(id="shared"))
        store.apply_events("shared", [RunStarted(pid=1, total_steps=60, run_id="shared", seq=0, ts=0.0)])
        at = time.time() + 2.0
        pool.starmap(_fold, [(pg_url, "shared", at), (pg_url, "shared", at)], chunksize=1)
        # Each checkpoint event is recorded once, however the two folds interleaved.
        run = store.get_run("shared")
        assert run.last_seq == 60 and run.step == 59
        assert [c.step for c in store.checkpoints("shared")] == list(range(3, 61, 3))
        # Two processes writing different fields of one row lose neither's writes.
        at = time.time() + 2.0
        pool.starmap(
            _touch, [(pg_url, "shared", "pid", at), (pg_url, "shared", "exit_code", at)], chunksize=1
        )
        run = store.get_run("shared")
        assert (run.pid, run.exit_code, run.last_seq) == (39, 39, 60)
    store.engine.dispose()


def test_a_plain_postgresql_url_uses_the_installed_driver(pg_server: str, pg_url: str) -> None:
    """`postgresql://` (what people paste) works with psycopg 3 installed and no psycopg2."""
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    store = Store(plain)
    store.add_run(Run(id="p"))
    assert store.get_run("p").status == "queued"
    assert "psycopg" in store.engine.dialect.driver
    store.engine.dispose()


def test_an_unreachable_database_is_a_coded_error_without_the_password() -> None:
    port = _free_port()  # nothing listens there
    with pytest.raises(BackpropError) as err:
        Store(f"postgresql://backprop:s3cret-pw@127.0.0.1:{port}/backprop")
    assert err.value.code == "CONFIG_INVALID_SETTING"
    assert f"127.0.0.1:{port}" in err.value.message and "s3cret-pw" not in err.value.message
    assert "BACKPROPAGATE_DB_URL" in (err.value.hint or "")
