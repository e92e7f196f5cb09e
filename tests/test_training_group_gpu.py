"""GPU tier of the data-parallel loop: one rank under torchrun on one GPU, in an NCCL group.

The rank joins the group as the worker does for several ranks and trains through the group path
(device cuda:LOCAL_RANK, NCCL collectives, gradient exchange, per-rank RNG in checkpoints); it is
stopped after step 3, resumed, and must land on the curve of a plain one-process run.
Skipped without a CUDA GPU. On a GPU machine: ``pytest tests/test_training_group_gpu.py -q``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from backpropagate.config import RunConfig  # noqa: E402
from backpropagate.events import read_events  # noqa: E402
from backpropagate.training import run_training  # noqa: E402

RANK = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from backpropagate.config import RunConfig
from backpropagate.events import EventLog, Step
from backpropagate.training import distributed as d, run_training
from backpropagate.training.control import RunControl

run_dir, stop_at = Path(sys.argv[1]), int(sys.argv[2])
assert d.init() and d.is_initialized()
(run_dir / "group.json").write_text(json.dumps({"backend": dist.get_backend(), "world": d.world_size()}))
control = RunControl()
with EventLog(run_dir / "events.jsonl", run_dir.name) as log:
    def emit(event):
        log.append(event)
        if isinstance(event, Step) and event.step == stop_at:
            control.request_stop("user")
    run_training(RunConfig.load(run_dir / "config.json"), run_dir, emit, control)
d.teardown()
"""


@pytest.fixture(scope="module")
def config(tmp_path_factory, home) -> RunConfig:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    path = tmp_path_factory.mktemp("gpu-group") / "facts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} times two?"},
                      {"role": "assistant", "content": f"{i} times two is {2 * i}."}]}
        for i in range(24)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return RunConfig(
        model="demo", data=str(path), max_seq_len=64, batch_size=2, grad_accum=2, steps=6,
        save_every=2, lora_dropout=0.1, eval_fraction=0.0, seed=5, backend="transformers",
    )  # fmt: skip


def _rank(run_dir: Path, stop_at: int, script: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "BACKPROPAGATE_DIST_BACKEND": "nccl"}
    done = subprocess.run(
        [*command, "--standalone", "--nproc-per-node", "1", str(script), str(run_dir), str(stop_at)],
        env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_one_nccl_rank_on_the_gpu_stops_resumes_and_matches_one_process(config, tmp_path):
    reference = run_training(config, tmp_path / "plain", lambda e: None)
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    run_dir = tmp_path / "runs" / "nccl"
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.json")

    _rank(run_dir, 3, script)  # stopped after step 3: checkpoint, cancelled
    assert json.loads((run_dir / "group.json").read_text()) == {"backend": "nccl", "world": 1}
    _rank(run_dir, 0, script)  # resumed to the end

    events = list(read_events(run_dir / "events.jsonl"))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    starts = [e for e in events if e.type == "run_started"]
    assert [(s.devices, s.world_size, s.resumed_from_step) for s in starts] == [
        (["cuda:0"], 1, None),
        (["cuda:0"], 1, 3),
    ]
    assert [e.type for e in events if e.type in ("cancelled", "completed")] == ["cancelled", "completed"]
    got = {e.step: e.loss for e in events if e.type == "step"}
    want = {h["step"]: h["loss"] for h in reference.history}
    assert sorted(got) == list(range(1, 7))
    # Dropout on: the resumed rank restored its RNG from the checkpoint. bf16 on the GPU: the
    # group's reductions may round differently from the plain run's.
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=2e-3), step
    print("max relative loss difference:", max(abs(got[s] - want[s]) / want[s] for s in got))
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
