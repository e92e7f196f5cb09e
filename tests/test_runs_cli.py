"""`backprop runs ...`, `backprop watch` and `backprop serve-api` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from test_api_server import Server, _kill_workers

from backpropagate.events import Cancelled, Completed, EventLog, Failed, RunStarted, Step


def cli(home, *args, timeout=120):
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def _write_run(home, run_id, events, **config):
    run_dir = home / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"data": "d.jsonl", **config}))
    with EventLog(run_dir / "events.jsonl", run_id) as log:
        for event in events:
            log.append(event)


@pytest.fixture
def home_with_runs(tmp_path):
    home = tmp_path / "home"
    steps = [Step(step=i, total_steps=3, epoch=i / 3, loss=3.0 / i, lr=1e-4) for i in (1, 2, 3)]
    _write_run(
        home, "20260101-000001-aaaa", [RunStarted(pid=1, total_steps=3), *steps, Completed(step=3)], name="ok"
    )
    _write_run(
        home, "20260101-000002-bbbb", [RunStarted(pid=1), Failed(code="RUNTIME_GPU_OOM", message="oom")]
    )
    _write_run(home, "20260101-000003-cccc", [RunStarted(pid=999999), steps[0]])
    return home


def test_reindex_list_show_delete(home_with_runs):
    home = home_with_runs
    out = cli(home, "runs", "reindex")
    assert out.returncode == 0 and "reindexed 3 run(s)" in out.stderr
    listed = json.loads(cli(home, "runs", "list", "--json").stdout)
    assert {r["id"]: r["status"] for r in listed} == {
        "20260101-000001-aaaa": "completed",
        "20260101-000002-bbbb": "failed",
        "20260101-000003-cccc": "interrupted",
    }
    only = json.loads(cli(home, "runs", "list", "--json", "--status", "failed").stdout)
    assert [r["id"] for r in only] == ["20260101-000002-bbbb"]
    table = cli(home, "runs", "list").stdout
    assert "20260101-000001-aaaa" in table and "completed" in table
    shown = json.loads(cli(home, "runs", "show", "20260101-000001-aaaa").stdout)
    assert shown["name"] == "ok" and shown["step"] == 3 and shown["loss"] == pytest.approx(1.0)
    missing = cli(home, "runs", "show", "nope")
    assert missing.returncode == 1 and "[STATE_RUN_NOT_FOUND]" in missing.stderr and "hint:" in missing.stderr
    assert cli(home, "runs", "delete", "20260101-000002-bbbb", "--yes").returncode == 0
    assert not (home / "runs" / "20260101-000002-bbbb").exists()
    assert len(json.loads(cli(home, "runs", "list", "--json").stdout)) == 2


def test_watch_follows_the_log_on_disk(home_with_runs):
    done = cli(home_with_runs, "watch", "20260101-000001-aaaa", "--json")
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5] and events[-1]["type"] == "completed"
    after = cli(home_with_runs, "watch", "20260101-000001-aaaa", "--json", "--after", "3")
    assert [json.loads(line)["seq"] for line in after.stdout.splitlines()] == [4, 5]
    failed = cli(home_with_runs, "watch", "20260101-000002-bbbb")
    assert failed.returncode == 1 and "RUNTIME_GPU_OOM" in failed.stderr


def test_serve_api_refuses_non_loopback(tmp_path):
    out = cli(tmp_path, "serve-api", "--host", "0.0.0.0", "--port", "8123")
    assert out.returncode == 1 and "[RUNTIME_UI_AUTH_NOT_ENFORCED]" in out.stderr


@pytest.mark.slow
def test_watch_and_runs_through_a_server(tmp_path):
    server = Server(tmp_path / "home", BACKPROPAGATE_STANDIN_STEP_S="0.05").start()
    try:
        data = tmp_path / "home" / "datasets" / "d.jsonl"
        data.write_text('{"text": "x"}\n')
        run = server.post("/api/runs", json={"data": str(data), "steps": 10, "device": "cpu"}).json()
        watched = cli(server.home, "watch", run["id"], "--url", server.url, "--json")
        assert watched.returncode == 0, watched.stderr
        steps = [json.loads(line) for line in watched.stdout.splitlines()]
        assert [e["step"] for e in steps if e["type"] == "step"] == list(range(1, 11))
        listed = json.loads(cli(server.home, "runs", "list", "--json", "--url", server.url).stdout)
        assert listed[0]["id"] == run["id"] and listed[0]["status"] == "completed"
        resumed = cli(server.home, "runs", "resume", run["id"], "--url", server.url)
        assert resumed.returncode == 1 and "[STATE_RUN_NOT_RESUMABLE]" in resumed.stderr
    finally:
        server.stop()
        _kill_workers(server.home)


def test_stop_and_resume_without_a_server(tmp_path):
    from test_worker_standin import standin_env

    home = tmp_path / "home"
    env = standin_env(BACKPROPAGATE_HOME=str(home), BACKPROPAGATE_STANDIN_STEP_S="0.05", COLUMNS="200")
    run_id = "20260101-000004-dddd"
    _write_run(
        home, run_id, [RunStarted(pid=1, total_steps=100), Cancelled(step=0)], steps=100, save_every=10
    )

    def run(*args):
        return subprocess.run([sys.executable, "-m", "backpropagate", *args], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip

    assert run("runs", "reindex").returncode == 0
    resumed = run("runs", "resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    shown = json.loads(run("runs", "show", run_id).stdout)
    assert shown["status"] == "running" and shown["pid"]
    events_path = home / "runs" / run_id / "events.jsonl"
    deadline = time.time() + 30
    while time.time() < deadline and len(events_path.read_text().splitlines()) < 6:
        time.sleep(0.05)
    stopped = run("runs", "stop", run_id)
    assert stopped.returncode == 0, stopped.stderr
    watched = run("watch", run_id, "--json", "--after", "2")
    assert watched.returncode == 0, watched.stderr
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert events[0]["type"] == "run_started" and events[-1]["type"] == "cancelled"
    assert events[-2]["type"] == "checkpoint"
