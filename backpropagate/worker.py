"""The training worker: ``python -m backpropagate.worker RUN_DIR``, one process per run.

Reads ``RUN_DIR/config.json``, appends events to ``RUN_DIR/events.jsonl`` and trains through the
engine (``run_training``). SIGTERM asks the engine to finish the step, checkpoint and emit
``cancelled`` (exit 0). Anything that escapes the engine becomes a ``failed`` event with a
catalogued code (exit 1), so the log always says how the run ended unless the process is killed.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import FINAL_TYPES, Cancelled, Completed, EventBase, EventLog
from backpropagate.runs.foreground import failed_event
from backpropagate.trackers import Trackers, open_trackers
from backpropagate.training.control import RunControl

# "module:function" of an alternative engine with the same contract as run_training.
ENGINE_ENV = "BACKPROPAGATE_ENGINE"
DEFAULT_ENGINE = "backpropagate.training:run_training"
LOCK_NAME = ".worker.lock"  # held (flock) by the one worker of a run while it lives
EXIT_LOCKED = 3  # another worker holds the run: this one touched nothing


def load_engine() -> Callable[..., Any]:
    """The training entry point named by BACKPROPAGATE_ENGINE (default: the built-in engine)."""
    spec = os.environ.get(ENGINE_ENV) or DEFAULT_ENGINE
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr or "run_training")
    except (ImportError, AttributeError) as exc:
        if spec == DEFAULT_ENGINE:  # the engine may live in its recipe module only
            try:
                from backpropagate.training.sft import run_training

                return run_training
            except ImportError:
                pass
        raise BackpropError(
            ErrorCode.RUNTIME_TRAINING_FAILED, f"Cannot load the training engine {spec!r}: {exc}"
        ) from exc


def read_run_id(run_dir: Path) -> str:
    """The run id: ``run.json``'s ``id`` when present, else the folder's name."""
    meta = run_dir / "run.json"
    if meta.exists():
        try:
            return str(json.loads(meta.read_text())["id"])
        except (ValueError, KeyError):
            pass
    return run_dir.name


def take_run_lock(run_dir: Path) -> int | None:
    """Take the run's worker lock, held until this process ends; None if another worker has it."""
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def run_lock_held(run_dir: Path) -> bool:
    """Whether a live worker holds the run's lock (the scheduler asks before it starts one)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's own shared lock
    return False


def _redirect_output(log_path: Path) -> None:
    # dup2 on the descriptors, not sys.stdout, so native libraries' output lands there too.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def run_worker(run_dir: Path) -> int:
    """Train the run in ``run_dir`` to its end; returns the process exit code."""
    run_dir = Path(run_dir).resolve()
    control = RunControl()

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"signal {signum}: stopping after the current step", flush=True)
        control.request_stop("signal")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Written only once the handlers are in place: the scheduler waits for it before SIGTERM.
    (run_dir / "worker.pid").write_text(f"{os.getpid()}\n")
    log = EventLog(run_dir / "events.jsonl", read_run_id(run_dir))
    last: dict[str, Any] = {"type": None, "step": None}
    trackers = Trackers({})

    def emit(event: EventBase) -> None:
        stamped = log.append(event)
        last["type"] = stamped.type  # type: ignore[attr-defined]
        last["step"] = getattr(stamped, "step", None) or last["step"]
        trackers.on_event(stamped)

    try:
        config = RunConfig.load(run_dir / "config.json")
        trackers = open_trackers(config, run_dir)  # a missing tracker fails before any loading
        run_training = load_engine()
        result = run_training(config, run_dir, emit, control)
        # The engine emits the final event; a return without one still must end the log.
        if last["type"] not in FINAL_TYPES:
            if control.stop_requested:
                emit(Cancelled(step=last["step"]))
            else:
                emit(Completed(step=int(getattr(result, "step", None) or last["step"] or 0)))
        return 0
    except BaseException as exc:  # noqa: BLE001 - every way out must be recorded in the log
        traceback.print_exc()
        if last["type"] not in FINAL_TYPES:
            emit(failed_event(exc, last["step"]))
        return 1
    finally:
        trackers.close()
        log.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m backpropagate.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    if not (run_dir / "config.json").is_file():
        print(f"{run_dir}/config.json not found", file=sys.stderr)
        return 2
    _redirect_output(run_dir / "worker.log")
    if take_run_lock(run_dir) is None:
        print(
            f"{ErrorCode.STATE_RUN_ACTIVE}: another worker holds {run_dir / LOCK_NAME}; "
            "this one exits without touching the run.",
            flush=True,
        )
        return EXIT_LOCKED
    from backpropagate.logs import configure_from_settings

    configure_from_settings("worker", run_id=read_run_id(run_dir))
    return run_worker(run_dir)


if __name__ == "__main__":
    sys.exit(main())
