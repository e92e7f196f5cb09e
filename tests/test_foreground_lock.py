"""A foreground run (`backprop train`, `Trainer`) holds its run's lock like a worker, so a server
that starts meanwhile re-attaches to it instead of marking it interrupted."""

from __future__ import annotations

import asyncio
import os

import pytest

import backpropagate.training
from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError
from backpropagate.events import Completed, EventLog, RunStarted, Step
from backpropagate.runs.foreground import train_in_process
from backpropagate.runs.liveness import release_run_lock, run_lock_held, take_run_lock
from backpropagate.runs.service import RunService
from backpropagate.runs.store import Run
from backpropagate.settings import Settings


def test_foreground_run_holds_the_lock_while_it_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(tmp_path / "home"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held: list[bool] = []

    def engine(config, run_dir, emit, control):
        held.append(run_lock_held(run_dir))
        emit(Completed(step=0))

    monkeypatch.setattr(backpropagate.training, "run_training", engine, raising=False)
    train_in_process(RunConfig(data="d.jsonl"), run_dir)
    assert held == [True] and not run_lock_held(run_dir)  # given back when the run ends

    lock = take_run_lock(run_dir)  # another process trains it
    try:
        with pytest.raises(BackpropError) as err:
            train_in_process(RunConfig(data="d.jsonl"), run_dir)
        assert err.value.code == "STATE_RUN_ACTIVE"
    finally:
        release_run_lock(lock)


def test_restarted_server_reattaches_to_a_foreground_run(tmp_path):
    async def main():
        service = RunService(Settings(home=tmp_path / "home"), gpu_indices=[])
        run_dir = service.run_dir("fg")
        run_dir.mkdir(parents=True)
        # What `backprop train` leaves in the store and the log while it trains (pid: this test).
        service.store.add_run(Run(id="fg", status="running", pid=os.getpid()))
        log = EventLog(run_dir / "events.jsonl", "fg")
        log.append(RunStarted(pid=os.getpid(), total_steps=2))
        lock = take_run_lock(run_dir)
        await service.start()
        try:
            await asyncio.sleep(0.2)
            assert service.hub.is_live("fg") and (await service.get("fg")).status == "running"
            log.append(Step(step=1, total_steps=2, epoch=0.5, loss=1.0, lr=0.1))
            log.append(Completed(step=2))
            release_run_lock(lock)
            for _ in range(200):
                if not service.hub.is_live("fg"):
                    break
                await asyncio.sleep(0.02)
            return await service.get("fg")
        finally:
            log.close()
            await service.close()

    run = asyncio.run(main())
    assert run.status == "completed" and run.step == 2


def test_stream_of_a_foreground_run_started_under_a_running_server(tmp_path):
    async def main():
        service = RunService(Settings(home=tmp_path / "home"), gpu_indices=[])
        await service.start()
        run_dir = service.run_dir("fg")
        run_dir.mkdir(parents=True)
        service.store.add_run(Run(id="fg", status="running", pid=os.getpid()))
        lock = take_run_lock(run_dir)
        log = EventLog(run_dir / "events.jsonl", "fg")
        log.append(RunStarted(pid=os.getpid(), total_steps=2))

        async def collect() -> list[int]:
            return [item.seq async for item in service.events("fg", heartbeat_s=0.2) if item is not None]

        try:
            got = asyncio.create_task(collect())
            await asyncio.sleep(0.3)  # the stream is open before the run goes on
            log.append(Step(step=1, total_steps=2, epoch=0.5, loss=1.0, lr=0.1))
            log.append(Completed(step=2))
            release_run_lock(lock)
            return await asyncio.wait_for(got, 30)
        finally:
            log.close()
            await service.close()

    assert asyncio.run(main()) == [1, 2, 3]
