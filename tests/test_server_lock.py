"""One server per home: a second `serve-api` on the same BACKPROPAGATE_HOME refuses with a code;
servers with their own homes share one database and each tends only its own runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_api_server import Server, _create, _kill_workers
from test_worker_standin import standin_env

from backpropagate.errors import BackpropError
from backpropagate.runs.scheduler import hold_server_lock
from backpropagate.runs.service import RunService
from backpropagate.runs.store import Run, Store
from backpropagate.settings import Settings


def test_the_lock_is_reentrant_in_one_process_and_refused_to_another(tmp_path: Path) -> None:
    runs = tmp_path / "home" / "runs"
    hold_server_lock(runs)
    hold_server_lock(runs)  # the CLI, then the server's own start, in one process
    code = f"from backpropagate.runs.scheduler import hold_server_lock; hold_server_lock({str(runs)!r})"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0
    assert "CONFIG_INVALID_SETTING" in other.stderr and f"pid {os.getpid()}" in other.stderr


def test_an_app_that_shuts_down_gives_the_home_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An app served in-process (a test client, an embedding program) holds the home only while it
    runs: once its lifespan ends, a server in another process may take it."""
    from fastapi.testclient import TestClient

    from backpropagate.server.app import create_app
    from backpropagate.settings import get_settings

    home = tmp_path / "home"
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(home))
    get_settings.cache_clear()
    code = (
        f"from backpropagate.runs.scheduler import hold_server_lock; hold_server_lock({str(home / 'runs')!r})"
    )
    try:
        with TestClient(create_app(gpu_indices=[])) as client:
            assert client.get("/api/runs").status_code == 200
            held = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
            assert held.returncode != 0 and "CONFIG_INVALID_SETTING" in held.stderr
        free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert free.returncode == 0, free.stderr
    finally:
        get_settings.cache_clear()


def test_a_server_leaves_alone_the_runs_of_another_home_on_a_shared_database(tmp_path: Path) -> None:
    """Server B starts on the database A uses: A's running and queued runs are not B's to settle."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = Store(url)
    (tmp_path / "a" / "runs" / "run-a").mkdir(parents=True)
    store.add_run(Run(id="run-a", status="running", pid=os.getpid()))
    store.add_run(Run(id="queued-a", status="queued", config={"data": "x.jsonl"}))

    async def start_b() -> None:
        service = RunService(Settings(home=tmp_path / "b", db_url=url), gpu_indices=[])
        await service.start()
        await asyncio.sleep(0.5)  # a settling pass would have run by now
        assert not service.scheduler.queue and service.scheduler.workers == {}
        await service.close()

    asyncio.run(start_b())
    assert store.get_run("run-a").status == "running"
    assert store.get_run("queued-a").status == "queued"


@pytest.mark.slow
def test_one_server_per_home_and_two_homes_on_one_database_start_each_run_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a = Server(tmp_path / "a", BACKPROPAGATE_DB_URL=url, BACKPROPAGATE_STANDIN_STEP_S="0.05").start()
    b = None
    try:
        run_id = _create(a, steps=30)["id"]
        # A second server on A's home refuses, naming the first; A is untouched.
        env = standin_env(BACKPROPAGATE_HOME=str(a.home), BACKPROPAGATE_DB_URL=url)
        command = [sys.executable, "-m", "backpropagate", "serve-api", "--port", str(a.port + 1)]
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 1, second.stderr
        assert "[CONFIG_INVALID_SETTING]" in second.stderr and "another server" in second.stderr
        assert f"pid {a.proc.pid}" in second.stderr and "hint:" in second.stderr
        # A server with its own home on the same database sees the run and leaves it to A.
        b = Server(tmp_path / "b", BACKPROPAGATE_DB_URL=url).start()
        assert b.get(f"/api/runs/{run_id}").status_code == 200
        assert (
            a.wait_status(run_id, {"completed", "failed", "interrupted", "cancelled"})["status"]
            == "completed"
        )
        log = (a.home / "runs" / run_id / "events.jsonl").read_text().splitlines()
        assert sum('"run_started"' in line for line in log) == 1
        assert not (b.home / "runs" / run_id).exists()
        a.kill()  # SIGKILL: the lock dies with its process, nothing stale is left
        code = f"from backpropagate.runs.scheduler import hold_server_lock; hold_server_lock({str(a.home / 'runs')!r})"
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
    finally:
        for server in (a, b):
            if server is not None:
                server.kill()
        _kill_workers(tmp_path / "a")


def test_refusal_is_a_catalog_error(tmp_path: Path) -> None:
    runs = tmp_path / "h" / "runs"
    code = (
        f"from backpropagate.runs.scheduler import hold_server_lock; hold_server_lock({str(runs)!r}); input()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        lock = tmp_path / "h" / ".server.lock"
        while not lock.exists() or not lock.read_text().strip():
            assert time.time() < deadline and holder.poll() is None
            time.sleep(0.05)
        with pytest.raises(BackpropError) as err:
            hold_server_lock(runs)
        assert err.value.code == "CONFIG_INVALID_SETTING" and str(holder.pid) in err.value.message
    finally:
        holder.kill()
        holder.wait(10)
