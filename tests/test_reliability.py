"""Reliability of runs: damaged event logs, stops racing resumes, unique run ids, one worker a run."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time

import pytest
from test_api_server import Server, _collect, _create, _kill_workers
from test_worker_standin import _make_run, _worker, run_training

from backpropagate.events import EventLog, Step, read_events
from backpropagate.runs.hub import LogTail, _read_after
from backpropagate.runs.ids import create_run_dir as server_create_run_dir
from backpropagate.runs.liveness import run_lock_held, take_run_lock
from backpropagate.training.run_ids import create_run_dir, is_run_id, new_run_id
from backpropagate.worker import EXIT_LOCKED


def _step(n: int, total: int = 9) -> Step:
    return Step(step=n, total_steps=total, epoch=n / total, loss=1.0 / n, lr=0.1)


def slow_exit_training(config, run_dir, emit, control=None):
    """The stand-in engine, then a slow exit after the final event (as a real engine's teardown)."""
    result = run_training(config, run_dir, emit, control)
    time.sleep(2.0)
    return result


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "home", BACKPROPAGATE_STANDIN_STEP_S="0.05").start()
    yield srv
    srv.stop()
    _kill_workers(srv.home)


def test_garbage_line_in_the_middle_and_torn_tail_keep_every_good_event(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    with EventLog(path, "r") as log:
        log.append(_step(1))
        log.append(_step(2))
    with path.open("ab") as fh:
        fh.write(b'{"type": "step", "seq": \n')  # a complete line that is not an event
        fh.write(b"\xff\xfe not even text\n")
    with EventLog(path, "r") as log:
        log.append(_step(3))
    good = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(b'{"type": "step", "run_id": "r", "se')  # a writer caught mid-line
    caplog.set_level(logging.WARNING)

    assert [e.seq for e in read_events(path)] == [1, 2, 3]
    assert [e.seq for e in read_events(path, after=2)] == [3]
    assert [e.seq for e in _read_after(path, 0)] == [1, 2, 3]
    assert [e.seq for e in _read_after(path, 2)] == [3]
    assert "line 3 of" in caplog.text and "line 4 of" in caplog.text

    tail = LogTail(path)
    assert [e.seq for e in tail.read()] == [1, 2, 3]
    assert tail.read() == []  # the torn line waits for the rest
    path.write_bytes(good[: good.index(b"\n") + 1])  # the file shrinks: read again from the start
    assert [e.seq for e in tail.read()] == [1]


def test_garbage_line_in_a_live_run_does_not_end_it(server):
    run = _create(server, steps=40)
    log_path = server.home / "runs" / run["id"] / "events.jsonl"
    with server.ws(run["id"]) as ws:
        first = _collect(ws, limit=5)
        with log_path.open("ab") as fh:
            fh.write(b"this is not an event\n")
        rest = _collect(ws)
    events = first + rest
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "completed"
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 41))
    final = server.wait_status(run["id"], {"completed"})
    assert final["step"] == 40
    metrics = server.get(f"/api/runs/{run['id']}/metrics", params={"max_points": 0})
    assert metrics.status_code == 200 and metrics.json()["total_points"] == 40


def test_stop_right_after_resume_cancels_the_run(tmp_path):
    server = Server(
        tmp_path / "home",
        BACKPROPAGATE_STANDIN_STEP_S="0.05",
        BACKPROPAGATE_ENGINE="test_reliability:slow_exit_training",
    ).start()
    try:
        _stop_right_after_resume(server)
    finally:
        server.stop()
        _kill_workers(server.home)


def _stop_right_after_resume(server: Server) -> None:
    run = _create(server, steps=200, save_every=100)
    with server.ws(run["id"]) as ws:
        _collect(ws, limit=5)
        assert server.post(f"/api/runs/{run['id']}/stop").status_code == 200
        assert _collect(ws)[-1]["type"] == "cancelled"
        # Its worker is still exiting: the resumed run waits in the queue for it.
        assert server.post(f"/api/runs/{run['id']}/resume").status_code == 200
    assert server.post(f"/api/runs/{run['id']}/stop").status_code == 200
    server.wait_status(run["id"], {"cancelled"}, timeout=30)
    time.sleep(3.0)  # a worker that was started anyway would train on meanwhile
    final = server.get(f"/api/runs/{run['id']}").json()
    assert final["status"] == "cancelled" and final["step"] < 200


def _ids(count: int) -> list[str]:
    return [new_run_id() for _ in range(count)]


def test_run_ids_from_four_processes_are_unique():
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        batches = pool.map(_ids, [2500] * 4)
    ids = [i for batch in batches for i in batch]
    assert len(ids) == 10_000 and len(set(ids)) == 10_000
    assert all(is_run_id(i) and len(i.rsplit("-", 1)[1]) == 16 for i in ids)
    assert server_create_run_dir is create_run_dir  # one generator behind every door


def test_run_folders_are_created_exclusively_even_when_ids_clash(tmp_path, monkeypatch):
    import backpropagate.training.run_ids as run_ids

    clashing = iter(["20260101-000000-0000000000000000"] * 3 + ["20260101-000000-0000000000000001"])
    monkeypatch.setattr(run_ids, "new_run_id", lambda: next(clashing))
    first = create_run_dir(tmp_path)
    second = create_run_dir(tmp_path)  # the same id comes up twice more: a new one is drawn
    assert first.name.endswith("0000") and second.name.endswith("0001")


def _door(runs: str, count: int) -> list[str]:
    return [create_run_dir(runs).name for _ in range(count)]


def test_two_doors_creating_folders_concurrently_never_share_one(tmp_path):
    runs = tmp_path / "runs"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        batches = pool.starmap(_door, [(str(runs), 1000)] * 2)
    made = batches[0] + batches[1]
    assert len(made) == len(set(made)) == 2000 == len(list(runs.iterdir()))


def test_a_second_worker_on_one_run_exits_3_without_touching_the_log(tmp_path):
    run_dir = _make_run(tmp_path, steps=10, save_every=5)
    first = _worker(run_dir, BACKPROPAGATE_STANDIN_STEP_S="0.1")
    deadline = time.time() + 30
    while not (run_dir / "worker.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = _worker(run_dir, BACKPROPAGATE_STANDIN_STEP_S="0.1")
    assert second.wait(60) == EXIT_LOCKED
    assert first.poll() is None  # the first one trains on undisturbed
    assert "STATE_RUN_ACTIVE" in (run_dir / "worker.log").read_text()
    assert first.wait(60) == 0
    events = list(read_events(run_dir / "events.jsonl"))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events].count("run_started") == 1 and events[-1].type == "completed"
    assert (run_dir / "worker.pid").read_text().strip() == str(first.pid)
    assert not run_lock_held(run_dir)  # released when the worker exits


def test_scheduler_refuses_to_start_a_run_whose_lock_is_held(server):
    run = _create(server, steps=200, save_every=100)
    with server.ws(run["id"]) as ws:
        _collect(ws, limit=3)
        server.post(f"/api/runs/{run['id']}/stop")
        _collect(ws)
    server.wait_status(run["id"], {"cancelled"})
    run_dir = server.home / "runs" / run["id"]
    deadline = time.time() + 30
    while run_lock_held(run_dir) and time.time() < deadline:
        time.sleep(0.05)  # the stopped worker may still be exiting
    lock = take_run_lock(run_dir)  # a worker the server does not know about
    assert lock is not None
    try:
        before = run_dir.joinpath("events.jsonl").read_bytes()
        server.post(f"/api/runs/{run['id']}/resume")
        refused = server.wait_status(run["id"], {"interrupted", "running"}, timeout=30)
        assert refused["status"] == "interrupted" and refused["error_code"] == "STATE_RUN_ACTIVE"
        assert run_dir.joinpath("events.jsonl").read_bytes() == before
    finally:
        os.close(lock)
