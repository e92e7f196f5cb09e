"""The rank-side helpers: a plain process is a world of one; a real 2-rank gloo group agrees on
flags, sums, broadcasts and gathers; a rank that dies makes the other raise, not hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backpropagate.training import distributed as dist_helpers

RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def plain_process(monkeypatch):
    for key in RANK_ENV:
        monkeypatch.delenv(key, raising=False)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_ENV}
    env.update(BACKPROPAGATE_DIST_BACKEND="gloo", OMP_NUM_THREADS="1", **extra)
    return env


def test_a_plain_process_is_a_world_of_one(plain_process):
    assert dist_helpers.init() is False and not dist_helpers.is_initialized()
    assert (dist_helpers.rank(), dist_helpers.world_size(), dist_helpers.local_rank()) == (0, 1, 0)
    assert dist_helpers.is_main() and dist_helpers.device_name() == "cpu"
    assert dist_helpers.shard([3, 1, 2]) == [3, 1, 2]
    assert dist_helpers.any_rank(True) and not dist_helpers.any_rank(False)
    assert dist_helpers.every_rank(True) and dist_helpers.sum_ranks(2.5) == 2.5
    assert dist_helpers.broadcast({"a": 1}) == {"a": 1} and dist_helpers.gather("x") == ["x"]
    dist_helpers.barrier()
    dist_helpers.teardown()


def test_backend_follows_the_switch_then_the_gpu(monkeypatch):
    monkeypatch.delenv("BACKPROPAGATE_DIST_BACKEND", raising=False)
    assert dist_helpers.backend_name(cuda_available=True) == "nccl"
    assert dist_helpers.backend_name(cuda_available=False) == "gloo"
    monkeypatch.setenv("BACKPROPAGATE_DIST_BACKEND", "gloo")
    assert dist_helpers.backend_name(cuda_available=True) == "gloo"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_deterministic_and_cover_the_step(world):
    for count in range(0, 11):
        items = [f"ex{i}" for i in range(count)]
        shares = [dist_helpers.shard(items, r, world) for r in range(world)]
        assert shares == [dist_helpers.shard(list(items), r, world) for r in range(world)]
        flat = [x for share in shares for x in share]
        assert sorted(flat) == sorted(items) and len(flat) == len(set(flat))
        assert max(map(len, shares)) == dist_helpers.shard_size(count, world)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        dist_helpers.shard([1, 2], 2, 2)


RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from backpropagate.training import distributed as d

    out = sys.argv[1]
    assert d.init(timeout_s=20) and d.init()  # joining twice is a no-op
    r = d.rank()
    result = {
        "rank": r, "world": d.world_size(), "local": d.local_rank(), "main": d.is_main(),
        "device": d.device_name(),
        "shard": d.shard(list(range(10))),
        "any_one": d.any_rank(r == 1), "any_none": d.any_rank(False),
        "every_one": d.every_rank(r == 1), "every_all": d.every_rank(True),
        "sum": d.sum_ranks(r + 1.5),
        "broadcast": d.broadcast({"micro_batch": 4 - r}),
        "gather": d.gather(f"rank{r}"),
    }
    d.barrier()
    with open(os.path.join(out, f"rank{r}.json"), "w") as f:
        json.dump(result, f)
    # Then rank 1 dies without a word, as a killed rank does: rank 0's next collective must raise.
    if r == 1:
        os._exit(7)
    time.sleep(0.3)
    start = time.monotonic()
    try:
        d.any_rank(True)
    except Exception as exc:
        print(f"raised after {time.monotonic() - start:.1f}s: {type(exc).__name__}", flush=True)
        d.teardown()
        d.teardown()
        sys.exit(3)
    print("no error", flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_agree_and_a_dead_rank_makes_the_other_raise(tmp_path):
    # Two plain processes with the variables torchrun sets (the launcher itself is tested with the
    # runs, tests/test_runs_launch.py); without an agent to kill rank 0, the collective must fail
    # on its own when rank 1 is gone.
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            env=_env(
                RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    start = time.monotonic()
    out0, _ = procs[0].communicate(timeout=90)
    out1, _ = procs[1].communicate(timeout=30)
    assert procs[1].returncode == 7, out1[-3000:]
    assert procs[0].returncode == 3, out0[-3000:]
    assert "raised after" in out0 and time.monotonic() - start < 60
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(x["rank"], x["world"], x["local"], x["main"]) for x in ranks] == [
        (0, 2, 0, True),
        (1, 2, 1, False),
    ]
    assert [x["device"] for x in ranks] == ["cpu", "cpu"]
    assert ranks[0]["shard"] == [0, 2, 4, 6, 8] and ranks[1]["shard"] == [1, 3, 5, 7, 9]
    for x in ranks:
        assert (x["any_one"], x["any_none"], x["every_one"], x["every_all"]) == (True, False, False, True)
        assert x["sum"] == 4.0 and x["broadcast"] == {"micro_batch": 4}
        assert x["gather"] == ["rank0", "rank1"]


def test_rank_helpers_read_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("BACKPROPAGATE_DIST_BACKEND", "nccl")
    assert (dist_helpers.rank(), dist_helpers.world_size(), dist_helpers.local_rank()) == (3, 4, 1)
    assert not dist_helpers.is_main() and dist_helpers.device_name() == "cuda:1"
    assert dist_helpers.shard(list(range(10))) == [3, 7]
    assert Path(dist_helpers.__file__).name == "distributed.py"
