"""The training worker: ``python -m backpropagate.worker RUN_DIR``, one process per run.

Reads ``RUN_DIR/config.json``, appends events to ``RUN_DIR/events.jsonl`` and trains through the
engine (``run_training``). SIGTERM asks the engine to finish the step, checkpoint and emit
``cancelled`` (exit 0). Anything that escapes the engine becomes a ``failed`` event with a
catalogued code (exit 1), so the log always says how the run ended unless the process is killed.

Under torchrun (a run with several processes, docs/scaling.md) every rank runs this module: the
worker joins the process group before the engine starts, and only rank 0 holds the run's lock,
writes ``worker.pid`` and the event log; the other ranks log to ``worker.rank<N>.log``.
"""

from __future__ import annotations

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
from backpropagate.events import FINAL_TYPES, Cancelled, Completed, EventBase, EventLog, Warning_
from backpropagate.runs.foreground import failed_event
from backpropagate.runs.liveness import LOCK_NAME, take_run_lock
from backpropagate.trackers import Trackers, open_trackers
from backpropagate.training.control import RunControl

# "module:function" of an alternative engine with the same contract as run_training.
ENGINE_ENV = "BACKPROPAGATE_ENGINE"
DEFAULT_ENGINE = "backpropagate.training:run_training"
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


def rank_of_process() -> int:
    """This process's rank in a torchrun group (0 for a plain worker)."""
    return int(os.environ.get("RANK", "0")) if "WORLD_SIZE" in os.environ else 0


def _join_group() -> None:
    from backpropagate.training import distributed

    distributed.init()
    print(
        f"joined the process group: backend {distributed.backend_name()}, rank {distributed.rank()} "
        f"of {distributed.world_size()}, device {distributed.device_name()}",
        flush=True,
    )


# What a collective raises when a peer rank died or hangs (gloo raises plain RuntimeErrors).
_GROUP_FAILURE_WORDS = ("gloo", "NCCL", "Connection closed", "Connection reset", "timed out", "Timed out")


def _is_group_failure(exc: BaseException) -> bool:
    """Whether ``exc`` came from the process group: another rank died, not this one's training."""
    if "torch" not in sys.modules:
        return False
    from torch.distributed import DistError

    if isinstance(exc, DistError):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc) for word in _GROUP_FAILURE_WORDS)


def run_worker(run_dir: Path) -> int:
    """Train the run in ``run_dir`` to its end; returns the process exit code."""
    run_dir = Path(run_dir).resolve()
    control = RunControl()
    main_rank = rank_of_process() == 0

    def on_signal(signum: int, _frame: Any) -> None:
        print(f"signal {signum}: stopping after the current step", flush=True)
        control.request_stop("signal")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    last: dict[str, Any] = {"type": None, "step": None}
    trackers = Trackers({})
    log: EventLog | None = None
    parallel = False
    if main_rank:
        log = EventLog(run_dir / "events.jsonl", read_run_id(run_dir))

    def emit(event: EventBase) -> None:
        if log is None:  # only rank 0 writes the run's events
            return
        stamped = log.append(event)
        last["type"] = stamped.type  # type: ignore[attr-defined]
        last["step"] = getattr(stamped, "step", None) or last["step"]
        trackers.on_event(stamped)

    try:
        config = RunConfig.load(run_dir / "config.json")
        run_training = load_engine()
        if config.multi_run is not None:  # a schedule of runs around the engine (training/multirun.py)
            from backpropagate.training.multirun import engine as multi_run_engine

            run_training = multi_run_engine(run_training)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # An engine trains data-parallel only when it says so; otherwise rank 0 trains alone
        # (on its first GPU, as a one-process run would) and the other ranks leave at once.
        # Under torchrun even a group of one trains through the group path (one code path for
        # every group size, so a one-GPU torchrun run checks the multi-GPU one).
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        parallel = (world > 1 or under_torchrun) and bool(getattr(run_training, "data_parallel", False))
        if world > 1 and not parallel and not main_rank:
            print("the training engine runs on one process: this rank has nothing to do", flush=True)
            return 0
        if parallel:
            _join_group()  # returns once every rank is here, each with its signal handlers set
        if main_rank:
            # Written only once the handlers are in place: the scheduler waits for it before
            # SIGTERM. Under torchrun it names the launcher, the process the scheduler signals.
            launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()
            (run_dir / "worker.pid").write_text(f"{launcher}\n")
            trackers = open_trackers(config, run_dir)  # a missing tracker fails before any loading
        if world > 1 and not parallel:
            emit(
                Warning_(
                    code=str(ErrorCode.CONFIG_INVALID_SETTING),
                    message=f"This run has {world} processes but the training engine trains on one; "
                    "rank 0 trains alone.",
                    hint="docs/scaling.md says which engines train data-parallel.",
                )
            )
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
            if parallel and _is_group_failure(exc):
                # A rank died: no final event, so the run ends `interrupted` (resumable) as after
                # any crashed worker; the warning says which way it went.
                emit(
                    Warning_(
                        code=str(ErrorCode.RUNTIME_WORKER_CRASHED),
                        message=f"A rank of the group stopped answering ({type(exc).__name__}: {exc}).",
                        hint="Resume the run to continue from its last checkpoint; "
                        "worker.rank<N>.log says why that rank ended.",
                    )
                )
            else:
                emit(failed_event(exc, last["step"], run_dir))
        return 1
    finally:
        trackers.close()
        if log is not None:
            log.close()
        if "WORLD_SIZE" in os.environ:
            from backpropagate.training import distributed

            distributed.teardown()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m backpropagate.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    if not (run_dir / "config.json").is_file():
        print(f"{run_dir}/config.json not found", file=sys.stderr)
        return 2
    rank = rank_of_process()
    _redirect_output(run_dir / ("worker.log" if rank == 0 else f"worker.rank{rank}.log"))
    if rank == 0 and take_run_lock(run_dir) is None:  # rank 0 holds the lock for the group
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
