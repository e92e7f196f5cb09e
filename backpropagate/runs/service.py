"""RunService: what the API and the CLI do with runs (submit, stop, resume, clone, delete).

Holds the store, the event hub and the scheduler of one server process.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.runs.hub import EventHub
from backpropagate.runs.ids import create_run_dir
from backpropagate.runs.scheduler import Scheduler
from backpropagate.runs.store import Run, Store, open_store
from backpropagate.settings import Settings, get_settings


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

    # Queries --------------------------------------------------------------------
    async def get(self, run_id: str) -> Run:
        return await asyncio.to_thread(self.store.get_run, run_id)

    async def list(self, status: list[str] | None = None) -> list[Run]:
        return await asyncio.to_thread(self.store.list_runs, status)

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    # Commands -----------------------------------------------------------------
    async def submit(self, config: RunConfig) -> Run:
        data = config.model_dump(mode="json")
        self.scheduler.check_fits(data)

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
        return await self.scheduler.resume(run_id)

    async def delete(self, run_id: str) -> None:
        run = await self.get(run_id)
        if self.scheduler.is_active(run):
            raise BackpropError(
                ErrorCode.STATE_RUN_ACTIVE, f"Run {run_id} is {run.status}; stop it before deleting it."
            )
        await asyncio.to_thread(self.store.delete_run, run_id)
        await asyncio.to_thread(shutil.rmtree, self.run_dir(run_id), True)
        self.hub.publish_deleted(run_id)
