"""The scheduler: a FIFO queue of runs, GPU/CPU slots, and the worker processes it starts.

A run starts when the head of the queue fits (``placement``): GPU runs take the indices they ask
for from the free set (``CUDA_VISIBLE_DEVICES``), CPU runs share ``max_concurrent_runs`` slots;
a queued run's row says what it waits for (``queued_reason``). A run with several processes is
launched through torchrun (``launch``), one rank per GPU. Workers run in their own process group
and outlive the server; a restarted server re-attaches to live ones (checked through
``/proc/<pid>/cmdline`` or the run's lock, which foreground runs hold too) and marks the others
``interrupted``. No run is left ``running``
without a process behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import Cancelled, EventLog
from backpropagate.logs import get_logger
from backpropagate.runs import launch
from backpropagate.runs.hub import EventHub
from backpropagate.runs.liveness import is_our_worker, run_alive, run_lock_held
from backpropagate.runs.placement import Placer, Request, behind, check_request, request_for
from backpropagate.runs.store import ACTIVE_STATUSES, RESUMABLE_STATUSES, Run, Store

log = get_logger(__name__)

WORKER_MODULE = launch.WORKER_MODULE
STOP_GRACE_S = 60.0  # SIGTERM lets the worker finish its step and checkpoint; then SIGKILL


_SERVER_LOCKS: dict[Path, int] = {}  # lock file -> open descriptor, held while the server runs


def hold_server_lock(runs_dir: Path) -> None:
    """Take ``HOME/.server.lock`` (beside ``runs_dir``) for this process, or refuse: another server
    schedules the runs here.

    A flock dies with its process, so a killed server never leaves a stale lock. Taking it again
    in the same process is a no-op. The descriptor is not inherited by workers (they outlive us).
    """
    path = (Path(runs_dir).resolve().parent / ".server.lock").resolve()  # not in runs/: no run folder
    if path in _SERVER_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _read_pid(path)
        os.close(fd)
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"another server{f' (pid {other})' if other else ''} already runs the runs of "
            f"{path.parent}: two would each start runs and ignore the other's stops",
            hint="Use that server (its --url), stop it first, or set BACKPROPAGATE_HOME to another folder.",
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _SERVER_LOCKS[path] = fd


def release_server_lock(runs_dir: Path) -> None:
    """Give ``HOME/.server.lock`` back: a server that shuts down inside a process that lives on
    (an app under a test client, an embedding program) must not keep the home to itself."""
    path = (Path(runs_dir).resolve().parent / ".server.lock").resolve()
    fd = _SERVER_LOCKS.pop(path, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def worker_command() -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE]


@dataclass
class Worker:
    run_id: str
    pid: int
    gpus: list[int]
    proc: subprocess.Popen[bytes] | None = None  # None for a worker re-attached after a restart
    kill_task: asyncio.Task[None] | None = field(default=None, repr=False)

    def alive(self, run_dir: Path) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        # Re-attached: our worker by pid, or a foreground run (`backprop train`) holding the lock.
        return run_alive(self.pid, run_dir)

    @property
    def exit_code(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None


class Scheduler:
    def __init__(
        self,
        store: Store,
        hub: EventHub,
        runs_dir: Path,
        *,
        gpu_indices: list[int] | None = None,
        max_cpu_runs: int = 1,
        command: list[str] | None = None,
        stop_grace_s: float = STOP_GRACE_S,
    ) -> None:
        self.store = store
        self.hub = hub
        self.runs_dir = runs_dir
        self.gpu_indices = list(gpu_indices or [])
        self.max_cpu_runs = max_cpu_runs
        self.command = command or worker_command()
        self.stop_grace_s = stop_grace_s
        self.queue: deque[str] = deque()
        self.workers: dict[str, Worker] = {}
        self.placer = Placer(self.gpu_indices, max_cpu_runs)
        self.waiting: dict[str, str] = {}  # queued run id -> the reason last written to its row
        self._lock = asyncio.Lock()

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    # Resources ----------------------------------------------------------------
    def request(self, config: dict) -> Request:
        """What a run config asks of this machine (GPUs, or a CPU slot and its ranks)."""
        from backpropagate.settings import Settings

        return request_for(config, self.gpu_indices, cpu_ranks=Settings().dist_backend == "gloo")

    def check_fits(self, config: dict) -> None:
        """Refuse at submission what could never start on this machine."""
        check_request(self.request(config), self.gpu_indices)

    # Queue ------------------------------------------------------------------------
    async def enqueue(self, run_id: str) -> None:
        if run_id not in self.queue:
            self.queue.append(run_id)
        await self.schedule()

    async def schedule(self) -> None:
        """Start queued runs in order while the head of the queue fits (strict FIFO: no overtaking)."""
        async with self._lock:
            while self.queue:
                head = self.queue[0]
                run, locked = await asyncio.to_thread(self._look_up, head)
                if not self.queue or self.queue[0] != head:
                    continue  # stopped (taken off the queue) while it was looked up
                if run is None or run.status != "queued":
                    self.queue.popleft()
                    continue
                if run.id in self.workers:
                    return  # its previous worker is still exiting; _on_end schedules again
                if locked:
                    self.queue.popleft()  # a worker this server does not know still runs it
                    await self._refuse_locked(run)
                    continue
                request = self.request(run.config)
                gpus, reason = self.placer.place(request)
                if gpus is None:
                    await self._note_waiting(head, reason or "waiting")
                    return
                self.queue.popleft()
                await self._spawn(run, gpus, request)

    async def _note_waiting(self, head: str, reason: str) -> None:
        """Write on each queued run's row what it waits for (only what changed)."""
        wanted = {run_id: behind(head) for run_id in self.queue}
        wanted[head] = reason
        for run_id, text in wanted.items():
            if self.waiting.get(run_id) == text:
                continue
            self.waiting[run_id] = text
            updated = await asyncio.to_thread(self._set_reason, run_id, text)
            if updated is not None:
                self.hub.publish_status(updated)

    def _set_reason(self, run_id: str, reason: str) -> Run | None:
        run = self.store.find_run(run_id)
        if run is None or run.status != "queued":
            return None
        return self.store.update_run(run_id, queued_reason=reason)

    def _look_up(self, run_id: str) -> tuple[Run | None, bool]:
        """The run's row, and whether a worker holds its lock."""
        return self.store.find_run(run_id), run_lock_held(self.run_dir(run_id))

    async def _spawn(self, run: Run, gpus: list[int], request: Request) -> None:
        run_dir = self.run_dir(run.id)
        env = dict(os.environ)  # fault-injection and engine variables pass through
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpus)
        env["PYTHONUNBUFFERED"] = "1"
        if launch.uses_torchrun(request.processes):
            # One rank per GPU (or CPU rank under the gloo switch); torchrun leads the group.
            command = launch.worker_command(run_dir, request.processes, python=self.command[0])
        else:
            command = [*self.command, str(run_dir)]
        self.placer.take(run.id, gpus)
        self.waiting.pop(run.id, None)
        with (run_dir / "worker.log").open("ab") as out:  # catches output before the worker redirects
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=run_dir,
                start_new_session=True,  # own process group: a signal to the server does not hit it
            )
        worker = Worker(run.id, proc.pid, gpus, proc)
        self.workers[run.id] = worker
        # Watch before marking it running: a stream that sees "running" must also find it live.
        self.hub.watch(run.id, lambda: worker.alive(run_dir), self._on_end)
        updated = await asyncio.to_thread(
            self.store.update_run,
            run.id,
            status="running",
            pid=proc.pid,
            gpus=gpus,
            exit_code=None,
            queued_reason=None,
        )
        self.hub.publish_status(updated)
        ranks = f", {request.processes} ranks" if request.processes > 1 else ""
        log.info("started run %s (pid %d, gpus %s%s)", run.id, proc.pid, gpus or "cpu", ranks)

    async def _refuse_locked(self, run: Run) -> None:
        log.warning("run %s not started: another worker holds its lock", run.id)
        updated = await asyncio.to_thread(
            self.store.update_run,
            run.id,
            status="interrupted",
            error_code=str(ErrorCode.STATE_RUN_ACTIVE),
            error_message="Another worker process still runs this run (it holds "
            f"{self.run_dir(run.id) / '.worker.lock'}); stop it, then resume.",
            ended_at=_now(),
        )
        self.hub.publish_status(updated)

    async def _on_end(self, run_id: str, run: Run | None, saw_final: bool) -> None:
        """The worker is gone and its log drained: free its slot and settle its status."""
        worker = self.workers.pop(run_id, None)
        self.placer.release(run_id)
        if worker is not None and worker.kill_task is not None:
            worker.kill_task.cancel()
        run = await asyncio.to_thread(self.store.find_run, run_id)
        if run is not None and not saw_final and run.status in ("running", "paused"):
            code = worker.exit_code if worker else None
            how = f"with code {code}" if code is not None else "(exit code unknown: not our child)"
            pid = worker.pid if worker else run.pid
            run = await asyncio.to_thread(
                self.store.update_run,
                run_id,
                status="interrupted",
                exit_code=code,
                error_code=str(ErrorCode.RUNTIME_WORKER_CRASHED),
                error_message=f"The worker (pid {pid}) exited {how} without a final event; "
                "resume to continue from the last checkpoint.",
                ended_at=_now(),
            )
            log.warning("run %s interrupted: worker exited %s", run_id, how)
        elif run is not None and worker is not None and worker.exit_code is not None:
            run = await asyncio.to_thread(self.store.update_run, run_id, exit_code=worker.exit_code)
        if run is not None:
            self.hub.publish_status(run)
        await self.schedule()

    # Control ------------------------------------------------------------------
    async def stop(self, run_id: str) -> Run:
        run = await asyncio.to_thread(self.store.get_run, run_id)
        # A queued run has no worker of its own yet, even while the previous worker of a resumed
        # run is still exiting after its final event: the stop wins, the new worker never starts.
        waiting = run_id in self.queue or run_id not in self.workers
        if run.status == "queued" and waiting:
            with contextlib.suppress(ValueError):
                self.queue.remove(run_id)
            self.waiting.pop(run_id, None)
            # No worker writes this log now, so the server may record the end itself.
            await asyncio.to_thread(_append_cancelled, self.run_dir(run_id), run_id)
            run = await asyncio.to_thread(
                self.store.update_run, run_id, status="cancelled", ended_at=_now(), queued_reason=None
            )
            self.hub.publish_status(run)
            return run
        worker = self.workers.get(run_id)
        if worker is None:
            return run  # already ended: stopping is idempotent
        if worker.kill_task is None:
            worker.kill_task = asyncio.create_task(self._terminate(worker))
        return run

    async def _terminate(self, worker: Worker) -> None:
        """SIGTERM once the worker can handle it, SIGKILL if it is still alive after the grace period."""
        run_dir = self.run_dir(worker.run_id)
        pid_file = run_dir / "worker.pid"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_grace_s
        # A SIGTERM before the worker installed its handler would kill it without a checkpoint.
        # Under torchrun the file names the launcher: the group's leader (a re-attached worker's
        # pid is rank 0's, from its run_started event).
        ready = {worker.pid, _group_of(worker.pid)}
        while worker.alive(run_dir) and loop.time() < deadline and _read_pid(pid_file) not in ready:
            await asyncio.sleep(0.02)
        _signal_group(worker.pid, signal.SIGTERM, run_dir)
        while worker.alive(run_dir) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if worker.alive(run_dir):
            log.warning("run %s did not stop in %.0f s: killing it", worker.run_id, self.stop_grace_s)
            _signal_group(worker.pid, signal.SIGKILL, run_dir)

    async def resume(self, run_id: str) -> Run:
        run = await asyncio.to_thread(self.store.get_run, run_id)
        # Its old worker may still be exiting after its final event: the run then waits in the
        # queue until that process is gone (schedule() skips runs that still have a worker).
        if run.status not in RESUMABLE_STATUSES:
            raise BackpropError(
                ErrorCode.STATE_RUN_NOT_RESUMABLE,
                f"Run {run_id} is {run.status}; only {', '.join(sorted(RESUMABLE_STATUSES))} runs resume.",
            )
        run = await asyncio.to_thread(
            self.store.update_run, run_id, status="queued", error_code=None, error_message=None
        )
        self.hub.publish_status(run)
        await self.enqueue(run_id)
        return await asyncio.to_thread(self.store.get_run, run_id)

    def is_active(self, run: Run) -> bool:
        return run.id in self.workers or run.status in ACTIVE_STATUSES

    async def adopt(self, run_id: str) -> None:
        """Follow a run this server did not start while a process trains it (a foreground
        `backprop train` or Trainer holding the run's lock), so its events reach the hub."""
        if run_id in self.workers or self.hub.is_live(run_id):
            return
        run = await asyncio.to_thread(self.store.find_run, run_id)
        run_dir = self.run_dir(run_id)
        if run is None or run.status not in ("running", "paused") or run_id in self.workers:
            return
        if not await asyncio.to_thread(run_alive, run.pid, run_dir):
            return
        worker = Worker(run.id, run.pid or 0, list(run.gpus or []))
        self.workers[run.id] = worker
        log.info("following run %s trained by pid %s", run.id, run.pid)
        self.hub.watch(run.id, lambda: worker.alive(run_dir), self._on_end)

    # Restart ------------------------------------------------------------------
    async def recover(self) -> None:
        """On server start: re-attach live workers, settle dead ones, re-queue queued runs."""
        await asyncio.to_thread(hold_server_lock, self.runs_dir)
        runs = await asyncio.to_thread(self.store.list_runs, ["queued", "running", "paused"], 100000)
        for run in sorted(runs, key=lambda r: r.created_at):
            run_dir = self.run_dir(run.id)
            if not run_dir.is_dir():
                continue  # a run of another home sharing this database: its own server tends it
            if run.status == "queued":
                self.queue.append(run.id)
            elif run_alive(run.pid, run_dir):  # a worker, or a foreground run holding the lock
                worker = Worker(run.id, run.pid, list(run.gpus or []))
                self.workers[run.id] = worker
                self.placer.held[run.id] = list(run.gpus or [])  # as recorded, even if two rows clash
                log.info("re-attached run %s (pid %d)", run.id, run.pid)
                self.hub.watch(run.id, lambda w=worker, d=run_dir: w.alive(d), self._on_end)
            else:
                # Drain its log (it may have finished while the server was down), then settle.
                self.workers[run.id] = Worker(run.id, run.pid or 0, list(run.gpus or []))
                self.placer.held[run.id] = list(run.gpus or [])
                self.hub.watch(run.id, lambda: False, self._on_end)
        await self.schedule()


def _append_cancelled(run_dir: Path, run_id: str) -> None:
    with EventLog(run_dir / "events.jsonl", run_id) as events:
        events.append(Cancelled())


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _signal_group(pid: int, sig: int, run_dir: Path) -> None:
    """Signal the worker's process group: a worker (or torchrun) leads its own, ranks included."""
    if pid <= 0:  # a worker known only from an old row: 0 would be this server's own group
        return
    group = _group_of(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group == pid or (group is not None and is_our_worker(group, run_dir)):
            os.killpg(group, sig)
        else:  # not started by a scheduler (no group of its own): never signal someone else's group
            os.kill(pid, sig)


def _now() -> float:
    import time

    return time.time()
