"""`backprop train` for a run with several processes: torchrun in the foreground, followed by its log.

The ranks are the workers the server would start (``launch.worker_command``); this process only
launches them in their own session, turns the first Ctrl-C into SIGTERM for the group (every rank
finishes its step, rank 0 checkpoints once), kills the group on a second one, and reads rank 0's
``events.jsonl`` as it grows: the same events, store row and result as a one-process run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import EventBase, read_events
from backpropagate.runs.foreground import StoreSync
from backpropagate.runs.launch import worker_command
from backpropagate.runs.placement import request_for
from backpropagate.training.control import RunControl
from backpropagate.training.result import TrainResult

POLL_S = 0.2
EXIT_WAIT_S = 60.0  # after the final event, how long the launcher may take to see its ranks out


def processes_for(config: RunConfig) -> int:
    """How many ranks the run trains with on this machine (1: the ordinary in-process run)."""
    from backpropagate.gpu import list_gpus
    from backpropagate.settings import Settings

    inventory = [g.index for g in list_gpus()]
    cpu_ranks = Settings().dist_backend == "gloo"
    return request_for(config.model_dump(mode="json"), inventory, cpu_ranks=cpu_ranks).processes


def train_group(
    config: RunConfig,
    run_dir: Path,
    processes: int,
    on_event: Callable[[EventBase], None] | None = None,
    control: RunControl | None = None,
) -> TrainResult:
    """Train ``run_dir`` with ``processes`` ranks under torchrun; returns what ``train_in_process`` does."""
    run_dir = Path(run_dir).resolve()
    control = control or RunControl()
    log = run_dir / "events.jsonl"
    after = max((e.seq for e in read_events(log)), default=0)  # a resumed run's log goes on
    sync = StoreSync(run_dir.name, config)
    seen: dict[str, Any] = {"started": None, "final": None, "history": [], "evals": [], "step": None}

    def take(event: EventBase) -> None:
        kind = event.type  # type: ignore[attr-defined]
        if kind == "run_started":
            seen["started"] = event
        elif kind == "step":
            seen["history"].append(event.model_dump(exclude={"v", "type", "run_id", "seq", "ts"}))
        elif kind == "eval":
            seen["evals"].append(event.model_dump(exclude={"v", "type", "run_id", "seq", "ts"}))
        elif kind in ("completed", "failed", "cancelled"):
            seen["final"] = event
        seen["step"] = getattr(event, "step", None) or seen["step"]
        sync.push(event)
        if on_event is not None:
            on_event(event)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (run_dir / "worker.log").open("ab") as out:
        proc = subprocess.Popen(
            worker_command(run_dir, processes),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            cwd=run_dir,
            start_new_session=True,  # Ctrl-C reaches this process only; the group gets SIGTERM
        )
    signalled = False
    try:
        while True:
            for event in read_events(log, after):
                after = event.seq
                take(event)
            if proc.poll() is not None:
                for event in read_events(log, after):  # what was written just before the exit
                    after = event.seq
                    take(event)
                break
            if seen["final"] is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=EXIT_WAIT_S)
                continue
            # SIGTERM only once rank 0 says every rank has its handler (it writes worker.pid).
            if control.stop_requested and not signalled and _read_pid(run_dir / "worker.pid") == proc.pid:
                _signal(proc.pid, signal.SIGTERM)
                signalled = True
            time.sleep(POLL_S)
    except BaseException:  # a second Ctrl-C: no checkpoint, no orphaned ranks
        _signal(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        sync.flush()
    return _result(run_dir, seen, proc.returncode, sync)


def _result(run_dir: Path, seen: dict[str, Any], code: int | None, sync: StoreSync) -> TrainResult:
    final, started = seen["final"], seen["started"]
    if final is None:
        message = (
            f"The ranks exited (code {code}) without a final event; worker.log and worker.rank<N>.log "
            "say why."
        )
        if sync.store is not None:  # as the server marks a crashed worker: resumable
            with contextlib.suppress(Exception):
                sync.store.update_run(
                    run_dir.name,
                    status="interrupted",
                    exit_code=code,
                    error_code=str(ErrorCode.RUNTIME_WORKER_CRASHED),
                    error_message=message,
                    ended_at=time.time(),
                )
        raise BackpropError(
            ErrorCode.RUNTIME_WORKER_CRASHED,
            message,
            hint=f"Resume with: backprop train --resume {run_dir.name}",
        )
    if final.type == "failed":
        raise BackpropError(final.code, final.message, hint=final.hint)
    history, evals = seen["history"], seen["evals"]
    step = int(final.step or seen["step"] or 0)
    last_eval = evals[-1] if evals else {}
    adapter = getattr(final, "adapter_path", None)
    checkpoint = getattr(final, "checkpoint", None)
    return TrainResult(
        status="completed" if final.type == "completed" else "cancelled",
        run_id=run_dir.name,
        run_dir=run_dir,
        step=step,
        total_steps=int((started.total_steps if started else None) or step),
        final_loss=getattr(final, "final_loss", None) or (history[-1]["loss"] if history else None),
        eval_loss=getattr(final, "eval_loss", None) or last_eval.get("loss"),
        perplexity=last_eval.get("perplexity"),
        adapter_path=Path(adapter) if adapter else None,
        checkpoint=Path(checkpoint) if checkpoint else None,
        resumed_from_step=started.resumed_from_step if started else None,
        history=history,
        eval_history=evals,
        metrics=dict(getattr(final, "metrics", None) or {}),
    )


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # torchrun leads the session it was started in: the ranks get it too
