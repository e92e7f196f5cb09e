"""The scheduler: FIFO queue, GPU indices from the free set, CPU slots, refusals at submission."""

from __future__ import annotations

import asyncio
import os

import pytest
from test_worker_standin import standin_env

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError
from backpropagate.events import read_events
from backpropagate.runs.service import RunService
from backpropagate.settings import Settings


@pytest.fixture
def standin(monkeypatch):
    for key, value in standin_env(BACKPROPAGATE_STANDIN_STEP_S="0.03").items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)


async def _wait_all(service: RunService, ids: list[str], timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        runs = [await service.get(i) for i in ids]
        if all(r.status in ("completed", "failed", "cancelled", "interrupted") for r in runs):
            return
        await asyncio.sleep(0.05)
    raise AssertionError([(r.id, r.status) for r in runs])


def _data(service: RunService) -> str:
    """A data file where the service's path rules allow one (the stand-in engine never reads it)."""
    path = service.settings.datasets_dir / "d.jsonl"
    path.write_text('{"text": "hello"}\n')
    return str(path)


def _started(service: RunService, run_id: str):
    return next(e for e in read_events(service.run_dir(run_id) / "events.jsonl") if e.type == "run_started")


def test_gpu_runs_take_free_indices_in_fifo_order(tmp_path, standin):
    async def main():
        service = RunService(Settings(home=tmp_path / "home"), gpu_indices=[0, 1])
        await service.start()
        try:
            data = _data(service)
            two = await service.submit(RunConfig(data=data, steps=5, gpus=2))
            ones = [await service.submit(RunConfig(data=data, steps=20, gpus=1)) for _ in range(3)]
            assert (await service.get(ones[0].id)).status == "queued"  # behind the 2-GPU run
            ids = [two.id] + [r.id for r in ones]
            # Watch the scheduler's decisions as they happen (not worker start-up times, which
            # vary with machine load): which runs hold GPUs at the same moment.
            seen: set[tuple[str, ...]] = set()
            while any(r.status not in ("completed", "failed") for r in [await service.get(i) for i in ids]):
                seen.add(tuple(sorted(service.scheduler.workers)))
                await asyncio.sleep(0.01)
            await _wait_all(service, ids)
            return service, ids, seen
        finally:
            await service.close()

    service, ids, seen = asyncio.run(main())
    runs = {i: service.store.get_run(i) for i in ids}
    assert all(r.status == "completed" for r in runs.values())
    assert _started(service, ids[0]).device == "cuda:0,1" and runs[ids[0]].gpus == [0, 1]
    assert {_started(service, ids[1]).device, _started(service, ids[2]).device} == {"cuda:0", "cuda:1"}
    two, a, b, c = ids
    assert tuple(sorted((a, b))) in seen  # the two single-GPU runs shared the machine
    for moment in seen:
        assert two not in moment or moment == (two,)  # FIFO: nothing ran beside the 2-GPU run
        assert len(moment) <= 2 and {a, b, c} - set(moment)  # never three runs on two GPUs


def test_cpu_runs_limited_by_max_concurrent_runs(tmp_path, standin):
    async def main():
        settings = Settings(home=tmp_path / "home")
        service = RunService(settings, gpu_indices=[])
        await service.start()
        try:
            data = _data(service)
            ids = [(await service.submit(RunConfig(data=data, steps=4))).id for _ in range(3)]
            await _wait_all(service, ids)
            return service, ids
        finally:
            await service.close()

    service, ids = asyncio.run(main())
    runs = [service.store.get_run(i) for i in ids]
    assert [_started(service, i).device for i in ids] == ["cpu"] * 3
    for earlier, later in zip(runs, runs[1:], strict=False):
        assert later.started_at >= earlier.ended_at - 0.5  # one at a time, in order


def test_impossible_runs_refused_at_submission(tmp_path):
    async def main():
        service = RunService(Settings(home=tmp_path / "home"), gpu_indices=[0])
        cpu_only = RunService(Settings(home=tmp_path / "home2"), gpu_indices=[])
        codes = []
        for svc, config in (
            (service, RunConfig(data="d", gpus=2)),
            (cpu_only, RunConfig(data="d", device="cuda")),
        ):
            with pytest.raises(BackpropError) as err:
                await svc.submit(config)
            codes.append(err.value.code)
        return codes, service.store.list_runs()

    codes, runs = asyncio.run(main())
    assert codes == ["CONFIG_GPUS_UNAVAILABLE", "DEP_GPU_NOT_AVAILABLE"] and runs == []
