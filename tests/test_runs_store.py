"""The run store: schema and migrations, folding events into runs, rebuilding from the logs."""

from __future__ import annotations

import json
import sqlite3

import pytest

from backpropagate.errors import BackpropError
from backpropagate.events import Checkpoint, Completed, EventLog, Failed, RunStarted, Step
from backpropagate.runs.store import ExportRow, Run, Store


@pytest.fixture
def store(tmp_path):
    return Store(f"sqlite:///{tmp_path / 'db' / 'backprop.db'}")


def test_schema_created_in_wal_mode_and_migrations_idempotent(store, tmp_path):
    assert store.schema_version() == 2
    assert store.migrate() == 2 and store.migrate() == 2
    with sqlite3.connect(tmp_path / "db" / "backprop.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "checkpoints", "exports", "datasets", "schema_version"} <= tables
        assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 2


def test_events_fold_into_the_run_row(store):
    store.add_run(Run(id="r1", config={"data": "x"}))
    events = [
        RunStarted(pid=42, total_steps=4, run_id="r1", seq=1, ts=10.0),
        Step(
            step=1,
            total_steps=4,
            epoch=0.25,
            loss=2.5,
            lr=1e-4,
            tokens_per_s=900.0,
            run_id="r1",
            seq=2,
            ts=11.0,
        ),
        Checkpoint(step=1, path="/x/step-000001", bytes=123, run_id="r1", seq=3, ts=12.0),
        Step(step=2, total_steps=4, epoch=0.5, loss=2.0, lr=1e-4, run_id="r1", seq=4, ts=13.0),
    ]
    run = store.apply_events("r1", events)
    assert (run.status, run.pid, run.step, run.total_steps, run.loss, run.last_seq) == (
        "running",
        42,
        2,
        4,
        2.0,
        4,
    )
    assert run.started_at == 10.0
    # Replayed events (seq <= last_seq) are ignored: no duplicate checkpoints.
    store.apply_events("r1", events)
    assert [c.step for c in store.checkpoints("r1")] == [1]
    done = store.apply_events(
        "r1", [Completed(step=4, final_loss=1.5, metrics={"ppl": 4.5}, run_id="r1", seq=5, ts=20.0)]
    )
    assert done.status == "completed" and done.ended_at == 20.0
    assert done.final_metrics == {"ppl": 4.5, "final_loss": 1.5}
    assert store.get_run("r1").final_metrics == {"ppl": 4.5, "final_loss": 1.5}


def test_failed_event_records_code(store):
    store.add_run(Run(id="r2"))
    run = store.apply_events(
        "r2", [Failed(code="RUNTIME_GPU_OOM", message="oom", run_id="r2", seq=1, ts=1.0)]
    )
    assert (run.status, run.error_code, run.error_message) == ("failed", "RUNTIME_GPU_OOM", "oom")


def test_unknown_run_raises_catalog_error(store):
    with pytest.raises(BackpropError) as err:
        store.get_run("missing")
    assert err.value.code == "STATE_RUN_NOT_FOUND"


def _write_run(runs_dir, run_id, events, name=None):
    run_dir = runs_dir / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"data": "d.jsonl", "name": name}))
    (run_dir / "run.json").write_text(json.dumps({"id": run_id, "created_at": 100.0}))
    with EventLog(run_dir / "events.jsonl", run_id) as log:
        for event in events:
            log.append(event)


def test_reindex_rebuilds_runs_and_checkpoints_from_logs(store, tmp_path):
    runs_dir = tmp_path / "runs"
    _write_run(runs_dir, "done", [
        RunStarted(pid=1, total_steps=2),
        Step(step=1, total_steps=2, epoch=0.5, loss=3.0, lr=1e-4),
        Checkpoint(step=1, path="p1", bytes=10),
        Step(step=2, total_steps=2, epoch=1.0, loss=2.0, lr=1e-4),
        Completed(step=2, final_loss=2.0),
    ], name="finished")  # fmt: skip
    _write_run(
        runs_dir,
        "crashed",
        [RunStarted(pid=999999), Step(step=1, total_steps=9, epoch=0.1, loss=3.0, lr=1e-4)],
    )
    (runs_dir / "not-a-run").mkdir()
    # A stale row that disagrees with the log is replaced by what the log says.
    store.add_run(Run(id="done", status="running", step=99))
    assert store.reindex(runs_dir) == 2
    done = store.get_run("done")
    assert (done.status, done.step, done.name, done.last_seq, done.created_at) == (
        "completed",
        2,
        "finished",
        5,
        100.0,
    )
    assert [c.path for c in store.checkpoints("done")] == ["p1"]
    crashed = store.get_run("crashed")
    assert crashed.status == "interrupted" and crashed.error_code == "RUNTIME_WORKER_CRASHED"
    assert store.reindex(runs_dir) == 2 and len(store.checkpoints("done")) == 1  # idempotent


def test_exports_are_recorded_per_run_and_deleted_with_it(store):
    store.add_run(Run(id="r3"))
    store.add_export(
        ExportRow(run_id="r3", format="gguf-q8_0", path="/x/model.gguf", bytes=5, created_at=2.0)
    )
    store.add_export(ExportRow(run_id="r3", format="gguf-f16", path="/x/f16.gguf", bytes=9, created_at=1.0))
    assert [e.format for e in store.exports("r3")] == ["gguf-f16", "gguf-q8_0"]
    store.delete_run("r3")
    assert store.exports("r3") == [] and store.find_run("r3") is None


def test_reindex_keeps_a_live_worker_running(store, tmp_path):
    import subprocess
    import sys

    runs_dir = tmp_path / "runs"
    run_dir = (runs_dir / "live").resolve()
    # A process whose command line is a worker's for this run dir (it just sleeps).
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "backpropagate.worker", str(run_dir)]
    )
    try:
        _write_run(runs_dir, "live", [RunStarted(pid=proc.pid)])
        store.reindex(runs_dir)
        assert store.get_run("live").status == "running"
    finally:
        proc.kill()
        proc.wait()
    store.reindex(runs_dir)
    assert store.get_run("live").status == "interrupted"
