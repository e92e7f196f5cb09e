"""A stand-in training engine (same contract as run_training) and tests of the worker process.

The worker loads it through BACKPROPAGATE_ENGINE=test_worker_standin:run_training, so the service
tests exercise the real worker, event log and signals without loading a model. It honours
``steps``, ``save_every`` and resumes from its last checkpoint; BACKPROPAGATE_STANDIN_STEP_S sets
the time per step and BACKPROPAGATE_STANDIN_FAIL_AT fails a step with a catalogued error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import Cancelled, Checkpoint, Completed, RunStarted, Step, read_events

TESTS = Path(__file__).resolve().parent


def _last_checkpoint(run_dir: Path) -> int:
    folder = run_dir / "checkpoints"
    steps = (
        [int(p.name.split("-")[1]) for p in folder.glob("step-*") if p.is_dir()] if folder.exists() else []
    )
    return max(steps, default=0)


def _checkpoint(run_dir: Path, step: int, emit) -> None:
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "state.json").write_text(json.dumps({"step": step}))
    emit(Checkpoint(step=step, path=str(path), bytes=(path / "state.json").stat().st_size))


def run_training(config, run_dir, emit, control=None):
    total = config.steps or 10
    step_s = float(os.environ.get("BACKPROPAGATE_STANDIN_STEP_S", "0.05"))
    fail_at = int(os.environ.get("BACKPROPAGATE_STANDIN_FAIL_AT", "0"))
    start = _last_checkpoint(Path(run_dir))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    device = f"cuda:{visible}" if visible else "cpu"  # reports what the scheduler gave it
    emit(RunStarted(pid=os.getpid(), resumed_from_step=start or None, total_steps=total, device=device))
    for step in range(start + 1, total + 1):
        time.sleep(step_s)
        if step == fail_at:
            raise BackpropError(ErrorCode.RUNTIME_GPU_OOM, f"injected failure at step {step}")
        emit(
            Step(
                step=step,
                total_steps=total,
                epoch=step / total,
                loss=2.0 / step,
                lr=1e-4,
                tokens_per_s=1000.0,
            )
        )
        if step % config.save_every == 0:
            _checkpoint(Path(run_dir), step, emit)
        if control is not None and control.stop_requested and step < total:
            if step % config.save_every:
                _checkpoint(Path(run_dir), step, emit)
            emit(Cancelled(step=step, checkpoint=str(Path(run_dir) / "checkpoints" / f"step-{step:06d}")))
            return {"step": step}
    emit(Completed(step=total, final_loss=2.0 / total))
    return {"step": total}


def standin_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["BACKPROPAGATE_ENGINE"] = "test_worker_standin:run_training"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _make_run(tmp_path: Path, **config) -> Path:
    run_dir = tmp_path / "runs" / "20260101-000000-abcd"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(
        json.dumps({"data": "x.jsonl", "steps": 6, "save_every": 2, **config})
    )
    return run_dir


def _worker(run_dir: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "backpropagate.worker", str(run_dir)], env=standin_env(**env)
    )


def test_worker_runs_engine_to_completion(tmp_path):
    run_dir = _make_run(tmp_path)
    assert _worker(run_dir, BACKPROPAGATE_STANDIN_STEP_S="0").wait(60) == 0
    events = list(read_events(run_dir / "events.jsonl"))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "run_started" and events[-1].type == "completed"
    assert all(e.run_id == run_dir.name for e in events)
    assert [e.step for e in events if e.type == "step"] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "worker.pid").read_text().strip().isdigit()


def test_worker_turns_engine_error_into_failed_event(tmp_path):
    run_dir = _make_run(tmp_path)
    assert _worker(run_dir, BACKPROPAGATE_STANDIN_STEP_S="0", BACKPROPAGATE_STANDIN_FAIL_AT="3").wait(60) == 1
    last = list(read_events(run_dir / "events.jsonl"))[-1]
    assert last.type == "failed" and last.code == "RUNTIME_GPU_OOM" and last.step == 2
    assert "injected failure" in (run_dir / "worker.log").read_text()


def test_worker_unknown_engine_fails_with_catalog_code(tmp_path):
    run_dir = _make_run(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "backpropagate.worker", str(run_dir)],
        env={**os.environ, "BACKPROPAGATE_ENGINE": "no_such_module:run"},
    )
    assert proc.wait(60) == 1
    last = list(read_events(run_dir / "events.jsonl"))[-1]
    assert last.type == "failed" and last.code == "RUNTIME_TRAINING_FAILED"


def test_worker_sigterm_checkpoints_and_cancels(tmp_path):
    run_dir = _make_run(tmp_path, steps=200, save_every=50)
    proc = _worker(run_dir, BACKPROPAGATE_STANDIN_STEP_S="0.05")
    deadline = time.time() + 30
    while time.time() < deadline and not any(e.type == "step" for e in read_events(run_dir / "events.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    events = list(read_events(run_dir / "events.jsonl"))
    assert events[-1].type == "cancelled"
    assert events[-2].type == "checkpoint" and events[-2].step == events[-1].step < 200
