"""A short soak of the real API: many runs started, stopped, resumed and deleted at random while
WebSocket clients follow them; afterwards nothing is lost or stuck.

Real `backprop serve-api` and real worker processes (the stand-in engine: the worker, event log,
signals and checkpoints are the real ones, only the model is not). Bounded to about a minute.
Checked at the end: every run that was not deleted ends ``completed`` after its last resume, its
event log has every seq once and in order and agrees with the store, each client saw each event
once and in order, deleted runs are gone from the API and the disk, and no worker is left behind.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
from test_api_server import Server, _create, _kill_workers

pytestmark = pytest.mark.slow

RUNS = 12
CHAOS_S = 12.0
FINAL = {"completed", "failed", "cancelled", "interrupted"}


def _worker_pids(home: Path) -> list[int]:
    """Processes whose command line names a run folder of this home (workers, torchrun, ranks)."""
    needle = str(home / "runs").encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _follow(server: Server, run_id: str, seen: dict[str, list[int]], stop: threading.Event) -> None:
    """One client: follow the run's stream, reconnecting with after=<last seq> like the UI does."""
    last = 0
    while not stop.is_set():
        try:
            with server.ws(run_id, after=last) as ws:
                for message in ws:
                    data = json.loads(message)
                    if data.get("type") == "heartbeat":
                        continue
                    if data.get("seq", 0) <= 0:  # the server refused the stream (deleted run)
                        return
                    seen.setdefault(run_id, []).append(data["seq"])
                    last = data["seq"]
                    if stop.is_set():
                        return
        except Exception:  # noqa: BLE001 - a stream ends with its run's final event or a delete
            pass
        time.sleep(0.2)  # then follow again: a resume adds events after the last one seen


def test_runs_started_stopped_resumed_and_deleted_at_random_end_well(tmp_path: Path) -> None:
    rng = random.Random(17)
    server = Server(
        tmp_path / "home", BACKPROPAGATE_STANDIN_STEP_S="0.03", BACKPROPAGATE_SERVER__MAX_CONCURRENT_RUNS="3"
    ).start()
    stop_clients = threading.Event()
    seen: dict[str, list[int]] = {}
    try:
        ids = [_create(server, steps=60, save_every=5)["id"] for _ in range(RUNS)]
        followed = ids[:4]
        clients = [
            threading.Thread(target=_follow, args=(server, run_id, seen, stop_clients), daemon=True)
            for run_id in followed
        ]
        for client in clients:
            client.start()

        # Chaos: racing clicks on random runs (a stop right after a resume included).
        deleted: set[str] = set()
        actions = 0
        counts = {"stop": 0, "resume": 0, "delete": 0}
        deadline = time.time() + CHAOS_S
        while time.time() < deadline:
            run_id = rng.choice([i for i in ids if i not in deleted])
            status = server.get(f"/api/runs/{run_id}").json()["status"]
            roll = rng.random()
            if status in ("queued", "running") and roll < 0.5:
                server.post(f"/api/runs/{run_id}/stop")
                counts["stop"] += 1
            elif status in ("cancelled", "interrupted", "failed"):
                if roll < 0.3 and run_id not in followed and len(deleted) < 3:
                    assert server.delete(f"/api/runs/{run_id}").status_code in (200, 204, 409)
                    if server.get(f"/api/runs/{run_id}").status_code == 404:
                        deleted.add(run_id)
                        counts["delete"] += 1
                else:
                    assert server.post(f"/api/runs/{run_id}/resume").status_code in (200, 409)
                    counts["resume"] += 1
                    if roll > 0.8:
                        server.post(f"/api/runs/{run_id}/stop")  # a stop right after a resume wins
            actions += 1
            time.sleep(rng.uniform(0.0, 0.1))
        print(f"soak: {actions} actions {counts}")
        assert actions > 10 and counts["stop"] and counts["resume"]

        # Settle: resume whatever was stopped until every remaining run completes.
        live = [i for i in ids if i not in deleted]
        deadline = time.time() + 60
        while time.time() < deadline:
            statuses = {i: server.get(f"/api/runs/{i}").json()["status"] for i in live}
            if all(s == "completed" for s in statuses.values()):
                break
            for run_id, status in statuses.items():
                if status in ("cancelled", "interrupted", "failed"):
                    server.post(f"/api/runs/{run_id}/resume")
            time.sleep(0.3)
        assert all(s == "completed" for s in statuses.values()), statuses

        incarnations = 0
        for run_id in live:
            run = server.get(f"/api/runs/{run_id}").json()
            lines = (server.home / "runs" / run_id / "events.jsonl").read_text().splitlines()
            log = [json.loads(line) for line in lines]
            assert [e["seq"] for e in log] == list(range(1, len(log) + 1)), run_id  # no gap, no twin
            assert log[-1]["type"] == "completed" and run["last_seq"] == len(log)
            assert run["step"] == 60
            incarnations += sum(e["type"] == "run_started" for e in log)
            # One worker at a time: every run_started follows the previous incarnation's final event.
            open_worker = False
            for event in log:
                if event["type"] == "run_started":
                    assert not open_worker, f"{run_id}: a second worker started beside the first"
                    open_worker = True
                elif event["type"] in FINAL:
                    open_worker = False
        print(f"soak: {len(live)} runs completed after {incarnations} worker starts; {len(deleted)} deleted")
        assert incarnations > len(live)  # some runs were stopped and resumed on the way
        for run_id in deleted:
            assert server.get(f"/api/runs/{run_id}").status_code == 404
            assert not (server.home / "runs" / run_id).exists()

        expected = {
            run_id: list(
                range(1, len((server.home / "runs" / run_id / "events.jsonl").read_text().splitlines()) + 1)
            )
            for run_id in followed
        }
        deadline = time.time() + 15
        while any(seen.get(r, []) != expected[r] for r in followed) and time.time() < deadline:
            time.sleep(0.2)
        stop_clients.set()
        for run_id in followed:
            got = seen.get(run_id, [])
            assert got == expected[run_id], (
                f"{run_id}: a client saw {len(got)} events of {len(expected[run_id])}"
            )
        deadline = time.time() + 10
        while _worker_pids(server.home) and time.time() < deadline:
            time.sleep(0.2)
        assert _worker_pids(server.home) == [], "workers left behind"
    finally:
        stop_clients.set()
        server.stop()
        _kill_workers(server.home)
