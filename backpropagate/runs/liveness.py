"""Whether a run has a live process behind it: the run's lock, and a worker's command line.

Every process that trains a run holds ``RUN_DIR/.worker.lock`` while it lives: a server's worker
(rank 0 for a group) and a foreground run (`backprop train`, ``Trainer``). The scheduler, the store's
reindex and the CLI ask here, so a run trained outside the server is alive to all of them.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from backpropagate.runs.launch import WORKER_MODULE

LOCK_NAME = ".worker.lock"  # held (flock) by the one process training a run while it lives


def take_run_lock(run_dir: Path) -> int | None:
    """Take the run's lock, held until this process ends or :func:`release_run_lock`; None if
    another process has it."""
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def release_run_lock(fd: int) -> None:
    """Give the lock back (a foreground run in a long-lived process, e.g. a notebook)."""
    os.close(fd)  # closing the descriptor releases its flock


def run_lock_held(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (the scheduler asks before it starts one)."""
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


def is_our_worker(pid: int, run_dir: Path) -> bool:
    """True when ``pid`` is alive and is a worker for ``run_dir`` (not a recycled pid)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    args = raw.decode(errors="replace").split("\0")
    return WORKER_MODULE in args and str(run_dir) in args


def run_alive(pid: int | None, run_dir: Path) -> bool:
    """Whether a process trains the run now: its worker by pid, or any holder of its lock."""
    return (bool(pid) and is_our_worker(int(pid or 0), run_dir)) or run_lock_held(run_dir)
