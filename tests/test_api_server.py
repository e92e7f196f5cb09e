"""The API against a real server process (`backprop serve-api`) and real worker subprocesses.

Workers run the stand-in engine of test_worker_standin (BACKPROPAGATE_ENGINE), so these tests
cover the service: scheduling, the event hub, WebSockets, restarts, crashes and stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_worker_standin import standin_env
from websockets.sync.client import connect

from backpropagate.events import read_events

pytestmark = pytest.mark.slow
REPO_EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, *, engine: bool = False, **env: str) -> None:
        """A server on a free loopback port; workers run the stand-in engine unless ``engine``."""
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if engine:
            self.env = {**os.environ, "BACKPROPAGATE_HOME": str(home), **env}
            self.env.pop("BACKPROPAGATE_ENGINE", None)
        else:
            self.env = standin_env(BACKPROPAGATE_HOME=str(home), **env)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        self.home.mkdir(parents=True, exist_ok=True)
        log = (self.home.parent / f"server-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backpropagate", "serve-api", "--port", str(self.port), "--log-level", "warning"],
            env=self.env, stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/api/runs", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(
            "server did not start: " + (self.home.parent / f"server-{self.port}.log").read_text()
        )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=30, **kw)

    def delete(self, path: str, **kw) -> httpx.Response:
        return httpx.delete(self.url + path, timeout=30, **kw)

    def wait_status(self, run_id: str, statuses: set[str], timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = self.get(f"/api/runs/{run_id}").json()
            if run["status"] in statuses:
                return run
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} stayed {run['status']}, wanted {statuses}")

    def ws(self, run_id: str, after: int = 0):
        return connect(f"ws://127.0.0.1:{self.port}/api/runs/{run_id}/events?after={after}", open_timeout=10)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "home", BACKPROPAGATE_STANDIN_STEP_S="0.05").start()
    yield srv
    srv.stop()
    _kill_workers(srv.home)


def _kill_workers(home: Path) -> None:
    for pid_file in (home / "runs").glob("*/worker.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def _data(home: Path) -> str:
    path = home / "datasets" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"text": "hello"}\n')
    return str(path)


def _create(server: Server, **config) -> dict:
    resp = server.post("/api/runs", json={"data": _data(server.home), "device": "cpu", **config})
    assert resp.status_code == 201, resp.text
    return resp.json()


def _collect(ws, until_final: bool = True, limit: int | None = None) -> list[dict]:
    out = []
    for message in ws:
        data = json.loads(message)
        if data["type"] == "heartbeat":
            continue
        out.append(data)
        if limit is not None and len(out) >= limit:
            break
    return out


def test_ws_streams_every_event_in_order_and_get_agrees_with_log(server):
    run = _create(server, steps=20, save_every=5, name="first")
    assert run["status"] in ("queued", "running") and run["name"] == "first"
    with server.ws(run["id"]) as ws:
        events = _collect(ws)  # iteration ends when the server closes the socket
        assert ws.close_code == 1000
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e["step"] for e in events if e["type"] == "step"] == list(range(1, 21))
    assert events[-1]["type"] == "completed"
    final = server.wait_status(run["id"], {"completed"})
    on_disk = list(read_events(server.home / "runs" / run["id"] / "events.jsonl"))
    assert [e.model_dump(mode="json") for e in on_disk] == events
    assert final["last_seq"] == on_disk[-1].seq and final["step"] == 20 and final["total_steps"] == 20
    assert final["loss"] == pytest.approx(2.0 / 20)
    checkpoints = server.get(f"/api/runs/{run['id']}/checkpoints").json()
    assert [c["step"] for c in checkpoints] == [5, 10, 15, 20]
    metrics = server.get(f"/api/runs/{run['id']}/metrics", params={"max_points": 0}).json()
    assert metrics["total_points"] == 20 and len(metrics["steps"]) == 20
    small = server.get(f"/api/runs/{run['id']}/metrics", params={"max_points": 6}).json()["steps"]
    assert small[0]["step"] == 1 and small[-1]["step"] == 20 and len(small) <= 6
    # A finished run's stream replays history after `after` and closes cleanly.
    with server.ws(run["id"], after=len(events) - 3) as ws:
        tail = _collect(ws)
    assert [e["seq"] for e in tail] == seqs[-3:]
    assert server.get("/api/runs", params={"status": "completed"}).json()[0]["id"] == run["id"]
    assert server.get("/api/runs", params={"status": "failed"}).json() == []


def test_server_killed_mid_run_reattaches_and_client_catches_up(server):
    run = _create(server, steps=200, save_every=50)
    with server.ws(run["id"]) as ws:
        first = _collect(ws, limit=8)
    last_seq = first[-1]["seq"]
    server.kill()  # SIGKILL: no shutdown code runs; the worker lives on in its own session
    time.sleep(0.5)
    server.start()  # same home, new port
    listed = server.get(f"/api/runs/{run['id']}").json()
    assert listed["status"] == "running", listed
    with server.ws(run["id"], after=last_seq) as ws:
        rest = _collect(ws)
    assert rest[0]["seq"] == last_seq + 1
    assert [e["seq"] for e in first + rest] == list(range(1, rest[-1]["seq"] + 1))
    assert rest[-1]["type"] == "completed"
    final = server.wait_status(run["id"], {"completed"})
    assert final["step"] == 200


def test_killed_worker_is_interrupted_then_resumes_from_checkpoint(server):
    run = _create(server, steps=40, save_every=5)
    run_dir = server.home / "runs" / run["id"]
    deadline = time.time() + 30
    while time.time() < deadline and not any(
        e.type == "checkpoint" for e in read_events(run_dir / "events.jsonl")
    ):
        time.sleep(0.05)
    pid = server.get(f"/api/runs/{run['id']}").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    interrupted = server.wait_status(run["id"], {"interrupted"}, timeout=20)
    assert interrupted["exit_code"] == -signal.SIGKILL
    assert interrupted["error_code"] == "RUNTIME_WORKER_CRASHED"
    assert server.post(f"/api/runs/{run['id']}/resume").status_code == 200
    with server.ws(run["id"], after=interrupted["last_seq"]) as ws:
        rest = _collect(ws)
    started = rest[0]
    assert started["type"] == "run_started" and started["seq"] == interrupted["last_seq"] + 1
    saved = max(
        e.step
        for e in read_events(run_dir / "events.jsonl")
        if e.type == "checkpoint" and e.seq < started["seq"]
    )
    assert started["resumed_from_step"] == saved
    assert [e["step"] for e in rest if e["type"] == "step"][0] == saved + 1
    assert rest[-1]["type"] == "completed"
    assert server.wait_status(run["id"], {"completed"})["error_code"] is None


def test_stop_checkpoints_cancels_and_resume_completes(server):
    run = _create(server, steps=200, save_every=100)
    with server.ws(run["id"]) as ws:
        _collect(ws, limit=5)
        assert server.post(f"/api/runs/{run['id']}/stop").status_code == 200
        events = _collect(ws)
    assert events[-1]["type"] == "cancelled" and events[-2]["type"] == "checkpoint"
    stopped = server.wait_status(run["id"], {"cancelled"})
    assert stopped["step"] < 200
    resumed = server.post(f"/api/runs/{run['id']}/resume").json()
    assert resumed["status"] in ("queued", "running")
    final = server.wait_status(run["id"], {"completed"}, timeout=60)
    assert final["step"] == 200
    # Completed runs do not resume; they can be cloned.
    again = server.post(f"/api/runs/{run['id']}/resume")
    assert again.status_code == 409 and again.json()["code"] == "STATE_RUN_NOT_RESUMABLE"
    clone = server.post(f"/api/runs/{run['id']}/clone", json={"steps": 3})
    assert clone.status_code == 201 and clone.json()["config"]["steps"] == 3
    assert server.wait_status(clone.json()["id"], {"completed"})["step"] == 3


def test_restart_settles_runs_that_ended_while_the_server_was_down(server):
    quick = _create(server, steps=3)
    slow = _create(server, steps=400)  # waits behind `quick` in the single CPU slot, then runs
    server.wait_status(quick["id"], {"completed"})
    server.wait_status(slow["id"], {"running"})
    slow_dir = server.home / "runs" / slow["id"]
    deadline = time.time() + 30
    while time.time() < deadline and not any(
        e.type == "step" for e in read_events(slow_dir / "events.jsonl")
    ):
        time.sleep(0.05)
    pid = server.get(f"/api/runs/{slow['id']}").json()["pid"]
    server.kill()
    os.killpg(pid, signal.SIGKILL)  # the worker dies while no server watches it
    time.sleep(0.5)
    server.start()
    settled = server.wait_status(slow["id"], {"interrupted"}, timeout=20)
    assert settled["error_code"] == "RUNTIME_WORKER_CRASHED" and settled["exit_code"] is None
    assert settled["last_seq"] == list(read_events(slow_dir / "events.jsonl"))[-1].seq
    assert server.get(f"/api/runs/{quick['id']}").json()["status"] == "completed"
    assert server.get("/api/runs", params={"status": "running"}).json() == []


def test_restart_catches_up_a_run_that_finished_while_the_server_was_down(server):
    run = _create(server, steps=30)
    with server.ws(run["id"]) as ws:
        _collect(ws, limit=3)
    server.kill()
    run_dir = server.home / "runs" / run["id"]
    deadline = time.time() + 30
    while time.time() < deadline and list(read_events(run_dir / "events.jsonl"))[-1].type != "completed":
        time.sleep(0.1)
    server.start()
    final = server.wait_status(run["id"], {"completed"}, timeout=20)
    assert final["step"] == 30 and final["last_seq"] == list(read_events(run_dir / "events.jsonl"))[-1].seq
