"""Exact resume: a run killed with SIGKILL (or with a corrupted checkpoint) continues as if never stopped."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.errors import ErrorCode
from backpropagate.training import run_training
from backpropagate.training.control import RunControl

pytestmark = pytest.mark.slow

STEPS = 8
CHILD = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from backpropagate.config import RunConfig
from backpropagate.events import EventLog
from backpropagate.training import run_training
run_dir = Path(sys.argv[2])
with EventLog(run_dir / "events.jsonl", run_dir.name) as log:
    run_training(RunConfig.load(Path(sys.argv[1])), run_dir, log.append)
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def config(tmp_path_factory, home) -> RunConfig:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    folder = tmp_path_factory.mktemp("resume-data")
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
        for i in range(12)
    ]  # fmt: skip
    (folder / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Dropout on, so that resuming must restore the RNG state too, not just weights and optimizer.
    return RunConfig(
        model="demo", data=str(folder / "sums.jsonl"), packing=False, max_seq_len=64, batch_size=2,
        grad_accum=2, lr=3e-3, lora_r=8, lora_alpha=16, lora_dropout=0.1, eval_fraction=0.0,
        steps=STEPS, save_every=2, keep_checkpoints=3, seed=7,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """The uninterrupted run."""
    return run_training(config, tmp_path_factory.mktemp("reference") / "run", lambda e: None)


def adapter_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def assert_same_run(result, reference) -> None:
    import torch

    assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
    got = [h["loss"] for h in result.history]
    want = [h["loss"] for h in reference.history]
    # Tight: a resume that skipped restoring the RNG is off by ~1e-3 here (dropout masks differ).
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    mine, theirs = adapter_weights(result.adapter_path), adapter_weights(reference.adapter_path)
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.allclose(mine[key], theirs[key], rtol=1e-4, atol=1e-6), key


def kill_at_checkpoint_then_resume(config: RunConfig, tmp_path: Path):
    """Train in a child process, SIGKILL it right after a random checkpoint, resume in-process."""
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    config.save(tmp_path / "config.json")
    kill_after = random.choice([2, 4, 6])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "config.json"), str(run_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    target = run_dir / "checkpoints" / f"step-{kill_after:06d}"
    deadline = time.time() + 240
    while not target.exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the child never reached its checkpoint"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (run_dir / "adapter").exists()  # really killed mid-run

    events = []
    result = run_training(config, run_dir, events.append)

    started = [e for e in events if e.type == "run_started"][0]
    assert started.resumed_from_step is not None and started.resumed_from_step >= kill_after
    assert result.status == "completed" and result.resumed_from_step == started.resumed_from_step
    assert not list((run_dir / "checkpoints").glob("*.partial"))
    return result


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(config, reference, tmp_path):
    result = kill_at_checkpoint_then_resume(config, tmp_path)
    assert_same_run(result, reference)


def test_dpo_sigkill_then_resume_reproduces_the_uninterrupted_run(config, tmp_path_factory, tmp_path):
    """The same for DPO: the reference log-probs (adapter off) and reward curve continue exactly."""
    folder = tmp_path_factory.mktemp("pairs")
    pairs = [
        {"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}."}
        for i in range(12)
    ]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    dpo = config.model_copy(update={"data": str(folder / "pairs.jsonl"), "objective": "dpo"})
    reference = run_training(dpo, tmp_path_factory.mktemp("dpo-reference") / "run", lambda e: None)
    result = kill_at_checkpoint_then_resume(dpo, tmp_path)
    assert_same_run(result, reference)
    margins = [h["reward_margin"] for h in result.history]
    assert margins == pytest.approx([h["reward_margin"] for h in reference.history], rel=1e-4, abs=1e-6)


def test_corrupted_checkpoint_falls_back_to_the_previous_one(config, reference, tmp_path):
    run_dir = tmp_path / "run"
    control = RunControl()

    def stop_at_5(event):
        if event.type == "step" and event.step == 5:
            control.request_stop("user")

    stopped = run_training(config, run_dir, stop_at_5, control)
    assert stopped.status == "cancelled" and stopped.step == 5
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-000002", "step-000004", "step-000005"]

    # Flip bytes in the newest checkpoint's weights (same size: only the hash can tell), and leave
    # a half-written folder behind as a crash during a save would.
    weights = ckpts / "step-000005" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    (ckpts / "step-000006.partial").mkdir()

    events = []
    result = run_training(config, run_dir, events.append)

    warnings = [e for e in events if e.type == "warning"]
    assert len(warnings) == 1 and warnings[0].code == ErrorCode.STATE_CHECKPOINT_INVALID
    assert "step-000005" in warnings[0].message and "sha256" in warnings[0].message
    assert result.resumed_from_step == 4
    assert not (ckpts / "step-000006.partial").exists()
    assert_same_run(result, reference)
