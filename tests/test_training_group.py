"""The real training loop data-parallel: two gloo CPU ranks through the real launcher (torchrun via
``runs.group.train_group``, what ``backprop train --gpus 2`` runs) train the demo model to the
loss curve of the one-process run with the same settings.

One SFT run has an out-of-memory injected on rank 1 (both ranks shrink the micro-batch and redo
the step) and rank 1 SIGKILLed after a checkpoint (the group ends, the run is `interrupted`);
resumed, it finishes on the one-process curve. A DPO run matches its one-process curve too.

Tolerance: the ranks sum their gradients in another order than one process does, so losses may
differ in the last float32 digits (measured: at most 3e-7 relative); we allow 1e-5, while a
step that missed a rank's gradient or counted its tokens twice is off by far more.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import read_events
from backpropagate.training import run_training

pytestmark = pytest.mark.slow

REL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def gloo(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "BACKPROPAGATE_FAKE_GPUS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("BACKPROPAGATE_DIST_BACKEND", "gloo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return monkeypatch


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_config(tmp_path_factory, home) -> RunConfig:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
        for i in range(14)
    ]  # fmt: skip
    data = _write(tmp_path_factory.mktemp("group-sft") / "sums.jsonl", rows)
    # An odd effective batch (3): rank 0 trains two examples of each step, rank 1 one. No dropout,
    # so that the ranks' own masks do not enter the comparison.
    return RunConfig(
        model="demo", data=str(data), packing=False, max_seq_len=64, batch_size=3, grad_accum=1,
        lr=3e-3, lora_r=8, lora_alpha=16, lora_dropout=0.0, eval_fraction=0.15, eval_every=3,
        steps=8, save_every=2, keep_checkpoints=3, seed=11, gpus=2,
    )  # fmt: skip


def _one_process(config: RunConfig, run_dir: Path):
    return run_training(config.model_copy(update={"gpus": 1}), run_dir, lambda e: None)


def _rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of rank ``rank`` of the group training ``run_dir`` (its environment names the rank)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in args and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def _max_rel(pairs: list[tuple[float, float]]) -> float:
    return max(abs(a - b) / abs(b) for a, b in pairs)


def _steps(run_dir: Path) -> list:
    return [e for e in read_events(run_dir / "events.jsonl") if e.type == "step"]


def test_two_ranks_recover_an_oom_on_one_survive_a_killed_rank_and_resume_on_the_curve(
    sft_config, tmp_path, gloo
):
    import threading

    from backpropagate.runs.group import train_group
    from backpropagate.runs.store import open_store

    reference = _one_process(sft_config, tmp_path / "one")
    run_dir = tmp_path / "runs" / "two-ranks"
    run_dir.mkdir(parents=True)
    sft_config.save(run_dir / "config.json")

    # Launch 1: out of memory on rank 1 at step 2; rank 1 SIGKILLed once step 4 is checkpointed.
    gloo.setenv("BACKPROPAGATE_FAULT_OOM_AT_STEP", "2")
    gloo.setenv("BACKPROPAGATE_FAULT_RANK", "1")
    killed: dict[str, float] = {}

    def kill_rank_1() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (run_dir / "checkpoints" / "step-000004").exists():
            time.sleep(0.05)
        pid = _rank_pid(run_dir, 1)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed["at"] = time.monotonic()

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    with pytest.raises(BackpropError) as crash:
        train_group(sft_config, run_dir, 2)
    killer.join(timeout=5)
    assert "at" in killed, "rank 1 was never found to kill"
    assert time.monotonic() - killed["at"] < 30  # the group went down within seconds
    assert crash.value.code == ErrorCode.RUNTIME_WORKER_CRASHED
    assert open_store().find_run(run_dir.name).status == "interrupted"
    assert _rank_pid(run_dir, 0) is None and _rank_pid(run_dir, 1) is None  # no orphaned rank

    events = list(read_events(run_dir / "events.jsonl"))
    started = next(e for e in events if e.type == "run_started")
    assert started.world_size == 2 and started.devices == ["cpu", "cpu"]
    oom = [e for e in events if e.type == "oom_recovered"]
    assert [(e.step, e.old_micro_batch, e.new_micro_batch, e.grad_accum) for e in oom] == [(2, 3, 1, 3)]
    first = {s.step: s for s in _steps(run_dir)}
    assert {1, 2, 3, 4} <= set(first) and first[3].micro_batch == 1
    for log in ("worker.log", "worker.rank1.log"):  # both ranks shrank, not only the one that failed
        assert "out of memory at step 2: micro-batch 3 -> 1" in (run_dir / log).read_text()

    # Launch 2: resume from the last checkpoint (step 4) to the end, no faults.
    gloo.delenv("BACKPROPAGATE_FAULT_OOM_AT_STEP")
    result = train_group(sft_config, run_dir, 2)
    # Step 4's checkpoint, or step 6's if rank 1 outran the kill by two steps.
    resumed = result.resumed_from_step
    assert result.status == "completed" and resumed in (4, 6)

    events = list(read_events(run_dir / "events.jsonl"))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # one writer: no gap, no repeat
    starts = [e for e in events if e.type == "run_started"]
    assert [(s.world_size, s.resumed_from_step) for s in starts] == [(2, None), (2, resumed)]
    checkpoints = [e.step for e in events if e.type == "checkpoint"]
    assert len(checkpoints) == len(set(checkpoints))  # written once each, by rank 0
    # The curve: every step (those repeated after the crash too) has the one-process loss.
    want = {h["step"]: h for h in reference.history}
    print(
        "max relative loss difference:", _max_rel([(s.loss, want[s.step]["loss"]) for s in _steps(run_dir)])
    )
    for s in _steps(run_dir):
        assert s.loss == pytest.approx(want[s.step]["loss"], rel=REL), s.step
        assert s.grad_norm == pytest.approx(want[s.step]["grad_norm"], rel=1e-3), s.step
    assert sorted({s.step for s in _steps(run_dir)}) == list(range(1, 9))
    evals = {e.step: e.loss for e in events if e.type == "eval"}
    assert evals and all(v == pytest.approx(next(r["loss"] for r in reference.eval_history
                                                  if r["step"] == k), rel=REL)
                         for k, v in evals.items())  # fmt: skip
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "worker.rank1.log").exists()


def test_dpo_with_two_ranks_follows_its_one_process_curve(sft_config, tmp_path, gloo):
    from backpropagate.runs.group import train_group

    pairs = [
        {"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.", "rejected": f"It is {a + b + 1}."}
        for a in range(4)
        for b in range(3)
    ]
    data = _write(tmp_path / "pairs.jsonl", pairs)
    config = sft_config.model_copy(
        update={"data": str(data), "objective": "dpo", "batch_size": 2, "grad_accum": 2, "steps": 5,
                "eval_fraction": 0.0, "eval_every": None, "save_every": 100}
    )  # fmt: skip
    reference = _one_process(config, tmp_path / "one")
    run_dir = tmp_path / "runs" / "dpo"
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.json")
    result = train_group(config, run_dir, 2)
    assert result.status == "completed"
    got = {s.step: s for s in _steps(run_dir)}
    assert sorted(got) == [1, 2, 3, 4, 5]
    print(
        "max relative loss difference:",
        _max_rel([(got[h["step"]].loss, h["loss"]) for h in reference.history]),
    )
    for h in reference.history:
        s = got[h["step"]]
        assert s.loss == pytest.approx(h["loss"], rel=REL)
        assert s.reward_margin == pytest.approx(h["reward_margin"], rel=1e-3, abs=1e-6)
        assert s.reward_accuracy == pytest.approx(h["reward_accuracy"])


GRADIENTS = """
import json, os, sys, threading, time
import torch
from backpropagate.training import distributed as d
from backpropagate.training.control import RunControl

assert d.init(timeout_s=30)
r = d.rank()
torch.manual_seed(r)  # different weights on each rank, until the broadcast
a = torch.nn.Parameter(torch.randn(3, 4))
b = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))  # another dtype: another bucket
c = torch.nn.Parameter(torch.randn(2))  # a gradient on rank 1 only
unused = torch.nn.Parameter(torch.randn(2))  # no gradient anywhere
d.broadcast_parameters([a, b, c, unused])
start = [p.detach().clone() for p in (a, b, c)]
a.grad = torch.full_like(a, r + 1.0)
b.grad = torch.full_like(b, 10.0 * (r + 1))
if r == 1:
    c.grad = torch.ones_like(c)
d.sum_gradients([a, b, c, unused], bucket_bytes=16)  # tiny buckets: one parameter each
out = {
    "a": a.grad.unique().tolist(), "b": b.grad.unique().tolist(), "c": c.grad.unique().tolist(),
    "unused": unused.grad is None, "start": [p.sum().item() for p in start],
    "each": d.sum_each([r, 1.5, 0.0]),
}
# One rank paused for a moment: both wait, then both go on; then one rank's stop stops both.
control = RunControl()
if r == 1:
    control.pause("temperature")
    threading.Timer(1.0, control.resume).start()
began = time.monotonic()
out["first"] = d.hold(control)
out["waited"] = time.monotonic() - began
if r == 0:
    control.request_stop("user")
out["second"] = d.hold(control)
with open(os.path.join(sys.argv[1], f"rank{r}.json"), "w") as f:
    json.dump(out, f)
d.teardown()
"""


def test_ranks_sum_gradients_start_from_one_set_of_weights_and_pause_together(tmp_path):
    import socket
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(GRADIENTS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        BACKPROPAGATE_DIST_BACKEND="gloo", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for x in ranks:
        assert x["a"] == [3.0] and x["b"] == [30.0] and x["c"] == [1.0] and x["unused"]
        assert x["each"] == [1.0, 3.0, 0.0]
        assert x["first"] is False and x["waited"] > 0.8  # rank 0 waited for rank 1's pause
        assert x["second"] is True  # rank 0's stop, seen by both at the same step
    assert ranks[0]["start"] == ranks[1]["start"]
