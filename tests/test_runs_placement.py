"""Placement: requests from configs, fitting on free GPUs, FIFO queueing and its reasons, release."""

from __future__ import annotations

import asyncio
import os

import pytest

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError
from backpropagate.runs.placement import Placer, Request, check_request, request_for


def _config(**fields) -> dict:
    return RunConfig(data="d.jsonl", **fields).model_dump(mode="json")


@pytest.mark.parametrize(
    ("fields", "inventory", "cpu_ranks", "expected"),
    [
        ({}, [0, 1], False, Request(1, processes=1)),
        ({"gpus": 2}, [0, 1, 2], False, Request(2, processes=2)),
        ({"gpus": "all"}, [0, 1, 2, 3], False, Request(4, processes=4)),
        ({"gpu_ids": [2, 0]}, [0, 1, 2], False, Request(2, (2, 0), processes=2)),
        ({"device": "cpu", "gpus": 2}, [0, 1], False, Request(0)),
        ({"gpus": 0}, [0, 1], False, Request(0)),
        # No GPU and device auto: the CPU, whatever gpus says; the gloo switch makes ranks of it.
        ({"gpus": 2}, [], False, Request(0)),
        ({"gpus": 2}, [], True, Request(0, processes=2)),
        ({"device": "cpu", "gpus": 3}, [0], True, Request(0, processes=3)),
        ({"gpus": "all"}, [], True, Request(0, processes=1)),
        # device cuda on a GPU-less machine stays a GPU request, so submission refuses it.
        ({"device": "cuda", "gpus": "all"}, [], False, Request(1, processes=1)),
    ],
)
def test_request_for_config(fields, inventory, cpu_ranks, expected):
    assert request_for(_config(**fields), inventory, cpu_ranks=cpu_ranks) == expected


def test_impossible_requests_are_refused_with_the_machine_named():
    check_request(Request(0, processes=4), [])  # CPU runs always fit eventually
    check_request(Request(2, (1, 3)), [0, 1, 2, 3])
    cases = [
        (Request(3), [0, 1], "CONFIG_GPUS_UNAVAILABLE", "3 GPUs"),
        (Request(1, (4,)), [0, 1], "CONFIG_GPUS_UNAVAILABLE", "[4]"),
        (Request(1), [], "DEP_GPU_NOT_AVAILABLE", "no GPU"),
    ]
    for request, inventory, code, text in cases:
        with pytest.raises(BackpropError) as err:
            check_request(request, inventory)
        assert err.value.code == code and text in err.value.message


def test_runs_fit_on_free_gpus_lowest_first_and_release_on_finish():
    placer = Placer([0, 1, 2, 3])
    gpus, reason = placer.place(Request(2))
    assert (gpus, reason) == ([0, 1], None)
    placer.take("a", gpus)
    assert placer.place(Request(2)) == ([2, 3], None)
    placer.take("b", [2, 3])
    gpus, reason = placer.place(Request(1))
    assert gpus is None
    assert reason == "waiting for 1 GPU: 0 of 4 free (GPU 0: run a, GPU 1: run a, GPU 2: run b, GPU 3: run b)"
    placer.release("a")
    assert placer.free() == [0, 1] and placer.place(Request(1)) == ([0], None)
    placer.release("a")  # releasing twice is harmless
    assert placer.free() == [0, 1]


def test_taking_held_gpus_is_a_bug_not_a_placement():
    placer = Placer([0, 1])
    placer.take("a", [1])
    with pytest.raises(ValueError):
        placer.take("b", [1])
    with pytest.raises(ValueError):
        placer.take("a", [0])  # one holding per run


def test_explicit_ids_wait_for_exactly_those_gpus():
    placer = Placer([0, 1, 2])
    placer.take("a", [1])
    gpus, reason = placer.place(Request(2, (1, 2)))
    assert gpus is None and reason == "waiting for GPUs 1, 2: GPU 1: run a"
    assert placer.place(Request(1, (2,))) == ([2], None)  # not the lowest free one: the one named
    placer.release("a")
    assert placer.place(Request(2, (1, 2))) == ([1, 2], None)


def test_all_takes_every_gpu_and_waits_for_the_machine_to_empty():
    inventory = [0, 1, 2]
    placer = Placer(inventory)
    everything = request_for(_config(gpus="all"), inventory)
    placer.take("small", [2])
    gpus, reason = placer.place(everything)
    assert gpus is None and reason == "waiting for 3 GPUs: 2 of 3 free (GPU 2: run small)"
    placer.release("small")
    assert placer.place(everything) == ([0, 1, 2], None)


def test_cpu_runs_share_the_cpu_slots():
    placer = Placer([], cpu_slots=2)
    placer.take("a", placer.place(Request(0))[0])
    placer.take("b", placer.place(Request(0, processes=2))[0])  # a multi-rank CPU run is one slot
    gpus, reason = placer.place(Request(0))
    assert gpus is None and reason is not None
    assert reason.startswith("waiting for a CPU slot: 2 of 2 in use (run a, run b;")
    placer.release("b")
    assert placer.place(Request(0)) == ([], None)


def test_cpu_runs_do_not_take_gpus_and_gpu_runs_do_not_take_cpu_slots():
    placer = Placer([0], cpu_slots=1)
    placer.take("cpu", [])
    assert placer.place(Request(1)) == ([0], None)
    placer.take("gpu", [0])
    assert placer.place(Request(0))[0] is None and placer.free() == []


def test_plan_is_first_in_first_out_and_says_why_each_run_waits():
    placer = Placer([0, 1, 2, 3])
    placer.take("old", [0])
    queue = [
        ("a", Request(2)),  # fits on 1, 2
        ("b", Request(2)),  # only GPU 3 left: waits
        ("c", Request(1)),  # would fit on 3, but never overtakes b
        ("d", Request(0)),  # a CPU run behind them waits too
    ]
    starts, waiting = placer.plan(queue)
    assert starts == [("a", [1, 2])]
    assert waiting == {
        "b": "waiting for 2 GPUs: 1 of 4 free (GPU 0: run old, GPU 1: run a, GPU 2: run a)",
        "c": "queued behind run b (runs start in the order they were queued)",
        "d": "queued behind run b (runs start in the order they were queued)",
    }
    assert placer.held == {"old": [0]}  # planning holds nothing
    placer.take("a", [1, 2])
    placer.release("old")
    starts, waiting = placer.plan(queue[1:])
    assert starts == [("b", [0, 3])]
    assert (
        waiting["c"]
        == "waiting for 1 GPU: 0 of 4 free (GPU 0: run b, GPU 1: run a, GPU 2: run a, GPU 3: run b)"
    )
    assert waiting["d"].startswith("queued behind run c ")


def test_plan_starts_everything_that_fits_in_order():
    placer = Placer([0, 1], cpu_slots=1)
    starts, waiting = placer.plan([("g1", Request(1)), ("c1", Request(0)), ("g2", Request(1))])
    assert starts == [("g1", [0]), ("c1", []), ("g2", [1])] and waiting == {}


# The scheduler's use of it: reasons on the run rows, through the API's model -------------------
@pytest.fixture
def standin(monkeypatch):
    from test_worker_standin import standin_env

    for key, value in standin_env(BACKPROPAGATE_STANDIN_STEP_S="0.05").items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)


def test_queued_runs_say_what_they_wait_for_until_they_start(tmp_path, standin):
    from backpropagate.runs.service import RunService
    from backpropagate.server.routes.runs import RunPublic
    from backpropagate.settings import Settings

    async def main():
        service = RunService(Settings(home=tmp_path / "home"), gpu_indices=[0, 1])
        await service.start()
        try:
            data = service.settings.datasets_dir / "d.jsonl"
            data.write_text('{"text": "hello"}\n')
            first = await service.submit(RunConfig(data=str(data), steps=30, gpu_ids=[1]))
            second = await service.submit(RunConfig(data=str(data), steps=2, gpu_ids=[1]))
            third = await service.submit(RunConfig(data=str(data), steps=2, gpus=1))
            listed = {r.id: RunPublic.of(r) for r in await service.list()}
            await service.stop(first.id)
            while (await service.get(third.id)).status != "completed":
                await asyncio.sleep(0.05)
            while (await service.get(second.id)).status != "completed":
                await asyncio.sleep(0.05)
            return first, second, third, listed, [await service.get(i) for i in (second.id, third.id)]
        finally:
            await service.close()

    first, second, third, listed, after = asyncio.run(main())
    assert listed[first.id].status == "running" and listed[first.id].queued_reason is None
    assert listed[second.id].status == "queued"
    assert listed[second.id].queued_reason == f"waiting for GPU 1: GPU 1: run {first.id}"
    # GPU 0 is free, but the third run never overtakes the second.
    assert (
        listed[third.id].queued_reason
        == f"queued behind run {second.id} (runs start in the order they were queued)"
    )
    assert [r.queued_reason for r in after] == [None, None] and after[0].gpus == [1]


def test_a_store_from_before_queued_reason_gains_the_column(tmp_path):
    import sqlite3

    from backpropagate.runs.store import Store

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as con:  # the schema-1 runs table, one row in it
        con.execute(
            "CREATE TABLE runs (id VARCHAR PRIMARY KEY, name VARCHAR, config JSON, status VARCHAR, "
            "created_at FLOAT, started_at FLOAT, ended_at FLOAT, pid INTEGER, gpus JSON, exit_code INTEGER, "
            "error_code VARCHAR, error_message VARCHAR, final_metrics JSON, last_seq INTEGER, step INTEGER, "
            "total_steps INTEGER, loss FLOAT, tokens_per_s FLOAT)"
        )
        con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at FLOAT)")
        con.execute("INSERT INTO schema_version VALUES (1, 0)")
        con.execute(
            "INSERT INTO runs VALUES ('r1', NULL, '{}', 'queued', 1, NULL, NULL, NULL, '[]', NULL, NULL, NULL, "
            "'{}', 0, 0, NULL, NULL, NULL)"
        )
    store = Store(f"sqlite:///{path}")
    assert store.schema_version() == 2 and store.migrate() == 2
    assert store.update_run("r1", queued_reason="waiting for 1 GPU").queued_reason == "waiting for 1 GPU"
