"""Runs trained in this process (`backprop train`, `Trainer`) are runs like any other.

They write the same ``events.jsonl`` a worker writes, hold the run's lock as a worker does (so a
server that starts or restarts meanwhile sees them alive, never ``interrupted``) and are
registered in the store, so `backprop runs list`, the API and the web app show them while they
train and after. Every way
out of the engine ends the log with a final event (a failure included), so `backprop watch`
returns and a later reindex knows how the run ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode, disk_full_error
from backpropagate.events import FINAL_TYPES, Cancelled, Completed, EventBase, EventLog, Failed
from backpropagate.logs import get_logger
from backpropagate.runs.liveness import LOCK_NAME, release_run_lock, take_run_lock
from backpropagate.training.control import RunControl

OnEvent = Callable[[EventBase], None]
# Step and telemetry events reach the store at most this often; everything else at once.
STORE_EVERY_S = 1.0
_FREQUENT = frozenset({"step", "gpu"})

log = get_logger(__name__)


def failed_event(exc: BaseException, step: int | None, where: Path | None = None) -> Failed:
    """The final ``failed`` event for any exception: its catalogued code (a full disk is
    RUNTIME_DISK_FULL, naming ``where``, the run folder, and its free space; resumable once space
    is freed), or RUNTIME_TRAINING_FAILED."""
    if isinstance(exc, BackpropError):
        err = exc
    else:
        err = disk_full_error(exc, where) or BackpropError(
            ErrorCode.RUNTIME_TRAINING_FAILED, f"{type(exc).__name__}: {exc}"
        )
    return Failed(code=str(err.code), message=err.message, hint=err.hint, retryable=err.retryable, step=step)


class StoreSync:
    """Folds this run's events into the store in small batches; a store problem never stops training."""

    def __init__(self, run_id: str, config: RunConfig) -> None:
        self.run_id = run_id
        self.pending: list[EventBase] = []
        self.last_flush = 0.0
        self.store: Any = None
        try:
            from backpropagate.runs.store import Run, open_store

            self.store = open_store()
            self.store.migrate()
            if self.store.find_run(run_id) is None:
                self.store.add_run(Run(id=run_id, name=config.name, config=config.model_dump(mode="json")))
        except Exception as exc:  # noqa: BLE001 - the run's own files still hold everything
            log.warning("run %s is not in the run store (%s); `backprop runs reindex` adds it", run_id, exc)
            self.store = None

    def push(self, event: EventBase) -> None:
        if self.store is None:
            return
        self.pending.append(event)
        if event.type not in _FREQUENT or time.monotonic() - self.last_flush >= STORE_EVERY_S:  # type: ignore[attr-defined]
            self.flush()

    def flush(self) -> None:
        if self.store is None or not self.pending:
            return
        try:
            self.store.apply_events(self.run_id, self.pending)
            self.pending = []
        except Exception as exc:  # noqa: BLE001 - retried at the next flush
            log.warning("could not update run %s in the store: %s", self.run_id, exc)
        self.last_flush = time.monotonic()


def train_in_process(
    config: RunConfig, run_dir: Path, on_event: OnEvent | None = None, control: RunControl | None = None
) -> Any:
    """Train ``config`` in ``run_dir`` in this process, as a registered run; returns the TrainResult.

    STATE_RUN_ACTIVE when another process (a worker, another `backprop train`) trains the run.
    """
    run_dir = Path(run_dir)
    control = control or RunControl()
    lock = take_run_lock(run_dir)
    if lock is None:
        raise BackpropError(
            ErrorCode.STATE_RUN_ACTIVE,
            f"Another process trains run {run_dir.name} (it holds {run_dir / LOCK_NAME}).",
            hint="Wait for it to end, or stop it, then resume.",
        )
    try:
        return _train_locked(config, run_dir, on_event, control)
    finally:
        release_run_lock(lock)


def _train_locked(config: RunConfig, run_dir: Path, on_event: OnEvent | None, control: RunControl) -> Any:
    from backpropagate.trackers import open_trackers
    from backpropagate.training import run_training

    trackers = open_trackers(config, run_dir)  # a missing tracker fails here, before any loading
    sync = StoreSync(run_dir.name, config)
    last: dict[str, Any] = {"type": None, "step": None}
    with EventLog(run_dir / "events.jsonl", run_dir.name) as events:

        def emit(event: EventBase) -> None:
            stamped = events.append(event)
            last["type"] = stamped.type  # type: ignore[attr-defined]
            last["step"] = getattr(stamped, "step", None) or last["step"]
            sync.push(stamped)
            trackers.on_event(stamped)
            if on_event is not None:
                on_event(stamped)

        try:
            result = run_training(config, run_dir, emit, control)
            if last["type"] not in FINAL_TYPES:  # the engine ends the log; make sure it is ended
                if control.stop_requested:
                    emit(Cancelled(step=last["step"]))
                else:
                    emit(Completed(step=int(getattr(result, "step", None) or last["step"] or 0)))
            return result
        except BaseException as exc:
            if last["type"] not in FINAL_TYPES:  # a second Ctrl-C aborts: resumable, not failed
                aborted = isinstance(exc, KeyboardInterrupt)
                emit(Cancelled(step=last["step"]) if aborted else failed_event(exc, last["step"], run_dir))
            raise
        finally:
            sync.flush()
            trackers.close()
