"""RunService: what the API, the web app and the CLI do with runs (submit, stop, resume, clone, delete).

Holds the store, the event hub and the scheduler of one server process. Its rules are checked
here, once, so every door gets them: a config's paths (``runs/inputs.py``) and whether it could
ever start on this machine, before anything is written or queued.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import ACTIVE_STATUSES, RESUMABLE_STATUSES
from backpropagate.runs.hub import HEARTBEAT_S, EventHub, Line
from backpropagate.runs.ids import create_run_dir
from backpropagate.runs.inputs import check_data_still_there, check_run_inputs
from backpropagate.runs.scheduler import Scheduler, release_server_lock
from backpropagate.runs.store import Run, Store, open_store
from backpropagate.settings import Settings, get_settings

# How long a delete waits for the worker of a run that has just ended to exit (it checkpoints
# and flushes after its final event).
DELETE_EXIT_WAIT_S = 30.0


def _detect_gpus() -> list[int]:
    from backpropagate.gpu import list_gpus  # NVML only; never torch

    return [g.index for g in list_gpus()]


class RunService:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: Store | None = None,
        gpu_indices: list[int] | None = None,
        worker_command: list[str] | None = None,
        stop_grace_s: float | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.settings.ensure_dirs()
        self.runs_dir = self.settings.runs_dir.resolve()
        self.store = store or open_store(self.settings.database_url)
        self.hub = EventHub(self.store, self.runs_dir)
        self.scheduler = Scheduler(
            self.store,
            self.hub,
            self.runs_dir,
            gpu_indices=_detect_gpus() if gpu_indices is None else gpu_indices,
            max_cpu_runs=self.settings.server.max_concurrent_runs,
            command=worker_command,
            **({"stop_grace_s": stop_grace_s} if stop_grace_s is not None else {}),
        )

    async def start(self) -> None:
        await self.scheduler.recover()

    async def close(self) -> None:
        await self.hub.stop_all()  # workers keep running; the next server re-attaches
        release_server_lock(self.runs_dir)

    # Queries --------------------------------------------------------------------
    async def get(self, run_id: str) -> Run:
        return await asyncio.to_thread(self.store.get_run, run_id)

    async def list(self, status: list[str] | None = None) -> list[Run]:
        return await asyncio.to_thread(self.store.list_runs, status)

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    async def events(
        self, run_id: str, after: int = 0, heartbeat_s: float = HEARTBEAT_S
    ) -> AsyncIterator[Line | None]:
        """The run's one typed stream, which the WebSocket and the web app's run page follow:
        events with seq > ``after``, history then live, without gaps; ``None`` is a heartbeat.
        STATE_RUN_NOT_FOUND for an unknown run; a run trained in the foreground is followed too."""
        await self.get(run_id)
        await self.scheduler.adopt(run_id)
        async for item in self.hub.stream(run_id, after, heartbeat_s=heartbeat_s):
            yield item

    # Rules --------------------------------------------------------------------
    async def check(self, config: RunConfig) -> RunConfig:
        """The config as it will run: fits this machine (the scheduler's placement rules: 422
        CONFIG_GPUS_UNAVAILABLE, 424 DEP_GPU_NOT_AVAILABLE), every path resolved inside the
        allowed folders (403) and existing (404 DATASET_NOT_FOUND)."""
        self.scheduler.check_fits(config.model_dump(mode="json"))
        return await asyncio.to_thread(check_run_inputs, config, self.settings, self.store)

    # Commands -----------------------------------------------------------------
    async def submit(self, config: RunConfig) -> Run:
        """Check ``config`` (fits, paths) and queue it; nothing is written when a check fails."""
        config = await self.check(config)
        data = config.model_dump(mode="json")

        def write() -> Run:
            run_dir = create_run_dir(self.runs_dir)
            run_id = run_dir.name
            run = Run(id=run_id, name=config.name, config=data, status="queued", created_at=time.time())
            config.save(run_dir / "config.json")
            (run_dir / "run.json").write_text(json.dumps({"id": run_id, "created_at": run.created_at}) + "\n")
            return self.store.add_run(run)

        run = await asyncio.to_thread(write)
        self.hub.publish_status(run)
        await self.scheduler.enqueue(run.id)
        return await self.get(run.id)

    async def clone(self, run_id: str, overrides: dict[str, Any] | None = None) -> Run:
        source = await self.get(run_id)
        data = dict(source.config)
        data["name"] = f"{source.name or source.id} (copy)"
        data.update(overrides or {})
        return await self.submit(RunConfig.parse(data))

    async def stop(self, run_id: str) -> Run:
        return await self.scheduler.stop(run_id)

    async def resume(self, run_id: str) -> Run:
        run = await self.get(run_id)
        if run.status in RESUMABLE_STATUSES:  # otherwise the scheduler's STATE_RUN_NOT_RESUMABLE
            await asyncio.to_thread(check_data_still_there, run.config)
        return await self.scheduler.resume(run_id)

    async def delete(self, run_id: str, exit_wait_s: float = DELETE_EXIT_WAIT_S) -> None:
        """Delete a run that has ended, with its folder; STATE_RUN_ACTIVE while it is active.

        A run that has just ended (``cancelled`` right after a stop) may still have its worker
        exiting for a few seconds: wait for the scheduler to see it gone (and reap it) rather
        than refuse, so the folder is never removed under a live process.
        """
        run = await self.get(run_id)
        if run.status in ACTIVE_STATUSES:
            raise BackpropError(
                ErrorCode.STATE_RUN_ACTIVE, f"Run {run_id} is {run.status}; stop it before deleting it."
            )
        deadline = time.monotonic() + exit_wait_s
        while self.scheduler.is_active(run):
            if time.monotonic() > deadline:
                raise BackpropError(
                    ErrorCode.STATE_RUN_ACTIVE,
                    f"Run {run_id} is {run.status} but its worker (pid {run.pid}) has not exited yet.",
                    hint="Try again in a moment; `backprop runs show ID` gives its status.",
                )
            await asyncio.sleep(0.05)
            run = await self.get(run_id)
            if run.status in ACTIVE_STATUSES:  # resumed meanwhile
                raise BackpropError(
                    ErrorCode.STATE_RUN_ACTIVE, f"Run {run_id} is {run.status}; stop it before deleting it."
                )
        await asyncio.to_thread(self.store.delete_run, run_id)
        await asyncio.to_thread(shutil.rmtree, self.run_dir(run_id), True)
        self.hub.publish_deleted(run_id)
