"""Stopped, deleted and disk-full runs against a real `backprop serve-api` and real training workers.

- A stopped run exports its newest checkpoint, through the one resolver the API's export jobs and
  `backprop export` share (a run id, or the checkpoint folder itself).
- Deleting a run right after it shows `cancelled` works at once: no 409 while its worker exits,
  no folder left, no process (not even a zombie) left.
- A full disk while a checkpoint is written (ENOSPC injected into the real worker by
  tests/faults/sitecustomize.py) fails the run with RUNTIME_DISK_FULL, naming the path and the
  free space, and the run resumes from its last complete checkpoint and completes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_api_server import Server, _kill_workers

from backpropagate.events import read_events

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
FAULTS = Path(__file__).resolve().parent / "faults"
DISK_FULL_RUN = "disk-full"
RUN = {
    "model": "demo", "data": str(REPO / "examples" / "quickstart.jsonl"), "max_seq_len": 64,
    "batch_size": 1, "grad_accum": 1, "eval_fraction": 0, "device": "cpu", "save_every": 2,
}  # fmt: skip


@pytest.fixture(scope="module")
def api(home: Path):
    fault_env = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p),
        "BACKPROPAGATE_TEST_ENOSPC_RUN_NAME": DISK_FULL_RUN,  # only that run's 2nd checkpoint fails
        "BACKPROPAGATE_TEST_ENOSPC_CHECKPOINT": "2",
    }
    server = Server(home, engine=True, **fault_env).start()
    try:
        yield server
    finally:
        server.stop()
        _kill_workers(home)


def _error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == code and body["message"] and body["hint"], body
    return body


def _start(api: Server, **config) -> str:
    resp = api.post("/api/runs", json={**RUN, **config})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _wait_checkpoint(api: Server, run_id: str, timeout: float = 240) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = api.get(f"/api/runs/{run_id}/checkpoints").json()
        if rows:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} wrote no checkpoint in {timeout} s")


def _backprop(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args], capture_output=True, text=True, env=env, timeout=300
    )


def _lora_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_a_stopped_run_exports_its_last_checkpoint_from_the_api_and_the_cli(api: Server, home: Path) -> None:
    run_id = _start(api, name="stopped export", steps=5000)
    _wait_checkpoint(api, run_id)
    assert api.post(f"/api/runs/{run_id}/stop").status_code == 200
    api.wait_status(run_id, {"cancelled"}, timeout=120)
    run_dir = home / "runs" / run_id
    assert not (run_dir / "adapter").exists()  # stopping writes a checkpoint, never the adapter

    # The API: an export job of the cancelled run.
    resp = api.post(f"/api/runs/{run_id}/exports", json={"format": "adapter"})
    assert resp.status_code == 202, resp.text
    deadline = time.time() + 240
    while (job := api.get(f"/api/exports/{resp.json()['id']}").json())["status"] == "running":
        assert time.time() < deadline, job
        time.sleep(0.3)
    assert job["status"] == "completed", job
    from_api = Path(job["path"])
    step = max(e.step for e in read_events(run_dir / "events.jsonl") if e.type == "checkpoint")
    checkpoint = run_dir / "checkpoints" / f"step-{step:06d}"

    # The CLI, given the checkpoint folder: the same resolver, the same weights.
    by_folder = _backprop(
        home, "export", str(checkpoint), "--format", "adapter", "--output", str(run_dir / "x")
    )
    assert by_folder.returncode == 0, by_folder.stderr
    weights = _lora_weights(from_api)
    assert weights and all("lora_" in name for name in weights)
    for folder in (run_dir / "x", run_dir / "from-checkpoint" / checkpoint.name):
        other = _lora_weights(folder)
        assert other.keys() == weights.keys() and all((other[k] == weights[k]).all() for k in weights)
    # ... and they are the checkpoint's own numbers, not a fresh adapter's.
    from safetensors.torch import load_file

    trained = load_file(checkpoint / "trainable.safetensors")
    b_weights = [v for k, v in weights.items() if "lora_B" in k]
    assert b_weights and any(v.abs().sum() > 0 for v in b_weights)  # LoRA B starts at zero
    assert sum(v.numel() for v in trained.values()) == sum(v.numel() for v in weights.values())


def test_delete_right_after_cancel_leaves_nothing(api: Server, home: Path) -> None:
    run_id = _start(api, name="delete me", steps=5000)
    _wait_checkpoint(api, run_id)
    pid = api.get(f"/api/runs/{run_id}").json()["pid"]
    api.post(f"/api/runs/{run_id}/stop")
    api.wait_status(run_id, {"cancelled"}, timeout=120)
    resp = api.delete(f"/api/runs/{run_id}")  # at once: its worker may still be exiting
    assert resp.status_code == 204, resp.text
    _error(api.get(f"/api/runs/{run_id}"), 404, "STATE_RUN_NOT_FOUND")
    assert not (home / "runs" / run_id).exists()
    assert not Path(f"/proc/{pid}").exists(), Path(f"/proc/{pid}/status").read_text()  # reaped, no zombie


def test_a_full_disk_at_a_checkpoint_is_disk_full_and_the_run_resumes(api: Server, home: Path) -> None:
    run_id = _start(api, name=DISK_FULL_RUN, steps=8)
    run = api.wait_status(run_id, {"failed", "completed"}, timeout=240)
    run_dir = home / "runs" / run_id
    assert (run_dir / "enospc-injected").exists()  # the fault fired (at the step-4 checkpoint)
    assert run["status"] == "failed" and run["error_code"] == "RUNTIME_DISK_FULL", run
    failed = [e for e in read_events(run_dir / "events.jsonl") if e.type == "failed"][-1]
    assert failed.retryable and "No space left" in failed.message and "MB free" in failed.message
    assert "resume" in failed.hint
    assert [c["step"] for c in api.get(f"/api/runs/{run_id}/checkpoints").json()] == [2]
    assert not (run_dir / "checkpoints" / "step-000004").exists()  # the torn one never counts

    assert api.post(f"/api/runs/{run_id}/resume").status_code == 200
    run = api.wait_status(run_id, {"completed", "failed"}, timeout=240)
    assert run["status"] == "completed", run
    started = [e for e in read_events(run_dir / "events.jsonl") if e.type == "run_started"]
    assert started[-1].resumed_from_step == 2
    assert not list((run_dir / "checkpoints").glob("*.partial"))
