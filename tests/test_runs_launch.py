"""Launching runs: the torchrun command line, and real 2-rank gloo runs on the CPU through the
scheduler (stop, resume, a killed rank) and through two torchrun agents acting as two nodes.

The ranks run a small data-parallel engine (``run_training`` below, loaded by the real worker
through BACKPROPAGATE_ENGINE) whose step "loss" is the mean of a fixed function over the step's
examples, each rank computing its shard and the group summing: the curve is known exactly, so a
2-rank run must reproduce the 1-process one.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.events import Cancelled, Checkpoint, Completed, RunStarted, Step, read_events
from backpropagate.runs import launch
from backpropagate.runs.launch import Nodes, torchrun_command, worker_command

TESTS = Path(__file__).resolve().parent
STEP_S = float(os.environ.get("BACKPROPAGATE_TEST_STEP_S", "0.25"))


# The engine the ranks run --------------------------------------------------------------------
def example_loss(x: int) -> float:
    return math.sin(x) ** 2


def step_examples(step: int, config) -> list[int]:
    """The examples of one optimizer step: the same list on every rank, and in a 1-process run."""
    return [step * 100 + i for i in range(config.batch_size * config.grad_accum)]


def expected_loss(step: int, config) -> float:
    examples = step_examples(step, config)
    return sum(map(example_loss, examples)) / len(examples)


def _resume_step(run_dir: Path) -> int:
    folder = run_dir / "checkpoints"
    return (
        max((int(p.name.split("-")[1]) for p in folder.glob("step-*")), default=0) if folder.exists() else 0
    )


def run_training(config, run_dir, emit, control=None):
    from backpropagate.training import distributed as d

    run_dir = Path(run_dir)
    total = config.steps or 6
    start = d.broadcast(_resume_step(run_dir))  # rank 0 read the folder; all start from there
    devices = d.gather(d.device_name())
    emit(
        RunStarted(
            pid=os.getpid(),
            resumed_from_step=start or None,
            total_steps=total,
            backend=f"{d.backend_name()} x{d.world_size()}" if d.is_initialized() else "single",
            device=",".join(devices),
        )
    )
    die = os.environ.get("BACKPROPAGATE_TEST_DIE", "")  # "RANK:STEP": that rank SIGKILLs itself once
    for step in range(start + 1, total + 1):
        time.sleep(STEP_S)
        mine = d.shard(step_examples(step, config))
        with (run_dir / f"shards.rank{d.rank()}.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "examples": mine}) + "\n")
        marker = run_dir / "rank-died"
        if die == f"{d.rank()}:{step}" and not marker.exists():
            marker.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)
        loss = d.sum_ranks(sum(map(example_loss, mine))) / len(step_examples(step, config))
        emit(Step(step=step, total_steps=total, epoch=step / total, loss=loss, lr=1e-4))
        stop = d.any_rank(bool(control and control.stop_requested))  # every rank stops at one step
        if step % config.save_every == 0 or (stop and step < total):
            if d.is_main():  # one checkpoint, written once
                path = run_dir / "checkpoints" / f"step-{step:06d}"
                path.mkdir(parents=True, exist_ok=True)
                (path / "state.json").write_text(json.dumps({"step": step}))
                emit(Checkpoint(step=step, path=str(path), bytes=(path / "state.json").stat().st_size))
            d.barrier()  # no rank runs ahead of a checkpoint it might resume from
        if stop and step < total:
            emit(Cancelled(step=step))
            return {"step": step}
    emit(Completed(step=total, final_loss=expected_loss(total, config)))
    return {"step": total}


run_training.data_parallel = True  # type: ignore[attr-defined]


# Command construction -------------------------------------------------------------------------
def test_one_process_is_the_plain_worker(tmp_path):
    assert worker_command(tmp_path, 1, python="/py") == ["/py", "-m", "backpropagate.worker", str(tmp_path)]


def test_several_processes_go_through_torchrun_standalone(tmp_path):
    command = worker_command(tmp_path, 4)
    assert command[: len(torchrun_command())] == torchrun_command()
    rest = command[len(torchrun_command()) :]
    assert rest == [
        "--standalone", "--nproc-per-node", "4", "--max-restarts", "0",
        "-m", "backpropagate.worker", str(tmp_path),
    ]  # fmt: skip
    # One rank through the same path (the GPU check of the torchrun launch).
    assert "--standalone" in worker_command(tmp_path, 1, force_torchrun=True)


def test_torchrun_is_the_environments_own(tmp_path):
    venv_python = Path(sys.executable)
    assert torchrun_command(str(venv_python)) == [str(venv_python.parent / "torchrun")]
    bare = tmp_path / "bin" / "python"
    bare.parent.mkdir()
    assert torchrun_command(str(bare)) == [str(bare), "-m", "torch.distributed.run"]


def test_multi_node_flags_pass_through(tmp_path):
    nodes = Nodes(nnodes=2, node_rank=1, rdzv_endpoint="ws1.lan:29400", rdzv_id="run-7")
    command = worker_command(tmp_path, 2, nodes=nodes)
    flags = command[len(torchrun_command()) :]
    assert "--standalone" not in flags
    assert flags[:10] == [
        "--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "ws1.lan:29400", "--rdzv-id", "run-7",
    ]  # fmt: skip
    assert flags[10:] == [
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "-m",
        "backpropagate.worker",
        str(tmp_path),
    ]
    one_gpu_each = worker_command(tmp_path, 1, nodes=nodes)  # one rank per node is still a group
    assert "--nnodes" in one_gpu_each


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"nnodes": 0, "node_rank": 0, "rdzv_endpoint": "h:1"}, "nnodes"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "node_rank"),
        ({"nnodes": 2, "node_rank": 0, "rdzv_endpoint": "h"}, "HOST:PORT"),
    ],
)
def test_bad_node_settings_are_refused(fields, problem):
    with pytest.raises(ValueError, match=problem):
        Nodes(rdzv_id="r", **fields)


def test_launch_cli_prints_the_command_and_checks_its_input(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    args = [
        str(tmp_path),
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        "10.0.0.5:29400",
        "--print",
    ]
    assert launch.main(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-3:] == ["-m", "backpropagate.worker", str(tmp_path)]
    assert printed[printed.index("--rdzv-id") + 1] == tmp_path.name  # the run folder names the group
    assert launch.main([str(tmp_path), "--nnodes", "2"]) == 2
    assert launch.main([str(tmp_path / "missing")]) == 2


# Real runs ------------------------------------------------------------------------------------
def _rank_env() -> dict[str, str]:
    return {
        "BACKPROPAGATE_ENGINE": "test_runs_launch:run_training",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")])),
        "BACKPROPAGATE_DIST_BACKEND": "gloo",
        "OMP_NUM_THREADS": "1",
    }


def _group_processes(run_dir: Path) -> list[int]:
    """Live processes (torchrun agents, ranks) working on ``run_dir``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (proc / "stat").read_text().split()[2]
        except OSError:
            continue
        if str(run_dir) in args and state != "Z":
            found.append(int(proc.name))
    return found


def _check_log(run_dir: Path, config) -> list:
    events = list(read_events(run_dir / "events.jsonl"))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # one writer: no gap, no repeat
    steps = [e for e in events if e.type == "step"]
    assert sorted({s.step for s in steps}) == list(range(1, config.steps + 1))
    # A step comes again only after a restart from an earlier checkpoint (a crash loses the steps
    # since the last one); every time it has the 1-process loss.
    previous = 0
    for event in events:
        if event.type == "run_started":
            previous = event.resumed_from_step or 0
        elif event.type == "step":
            assert event.step == previous + 1
            previous = event.step
            assert event.loss == pytest.approx(expected_loss(event.step, config), abs=1e-12)
    return events


def _check_shards(run_dir: Path, config) -> None:
    """Every step's examples were split between the two ranks: disjoint, together all of them."""
    seen: dict[int, list[list[int]]] = {}
    for rank in (0, 1):
        for line in (run_dir / f"shards.rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            seen.setdefault(row["step"], [[], []])[rank] = row["examples"]
    for step, (a, b) in seen.items():
        assert not set(a) & set(b) and sorted(a + b) == step_examples(step, config)


async def _until(service, run_id: str, ok, timeout: float = 90.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        run = await service.get(run_id)
        if ok(run):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} stuck at {run.status} (step {run.step})")


def test_two_cpu_ranks_stop_survive_a_killed_rank_and_resume_from_the_cli(tmp_path, monkeypatch):
    # One run, three launches: the server starts it and stops it; the server resumes it and one
    # rank is SIGKILLed; `backprop train --resume` finishes it. The log reads as one clean run.
    from backpropagate.runs.service import RunService
    from backpropagate.settings import Settings

    for key, value in _rank_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("BACKPROPAGATE_TEST_DIE", "1:4")  # on its second start, rank 1 dies at step 4
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(tmp_path / "home"))
    done_states = ("completed", "failed", "cancelled", "interrupted")

    async def main():
        service = RunService(Settings(home=tmp_path / "home"), gpu_indices=[0, 1], stop_grace_s=30)
        await service.start()
        try:
            data = service.settings.datasets_dir / "d.jsonl"
            data.write_text('{"text": "hello"}\n')
            config = RunConfig(data=str(data), steps=6, save_every=2, batch_size=3, grad_accum=1, gpus=2)
            run = await service.submit(config)
            run_dir = service.run_dir(run.id)
            await _until(service, run.id, lambda r: r.step >= 1)
            assert (await service.get(run.id)).gpus == [0, 1]
            await service.stop(run.id)  # SIGTERM to torchrun's group: every rank stops at one step
            stopped = await _until(service, run.id, lambda r: r.status in done_states)
            assert stopped.status == "cancelled" and stopped.step < 4
            await _until(service, run.id, lambda r: run.id not in service.scheduler.workers)
            assert _group_processes(run_dir) == []  # no orphaned rank after a stop

            await service.resume(run.id)
            started = time.monotonic()
            crashed = await _until(service, run.id, lambda r: r.status in done_states and r.step >= 3)
            assert crashed.status == "interrupted" and crashed.error_code == "RUNTIME_WORKER_CRASHED"
            await _until(service, run.id, lambda r: run.id not in service.scheduler.workers)
            assert time.monotonic() - started < 60 and _group_processes(run_dir) == []
            return run_dir, config
        finally:
            await service.close()

    run_dir, config = asyncio.run(main())
    # No GPU here: under the gloo switch `--gpus 2` (from the run's config) is two CPU ranks.
    done = subprocess.run(
        [str(Path(sys.executable).parent / "backprop"), "train", "--resume", run_dir.name, "--json"],
        env={k: v for k, v in os.environ.items() if k != "BACKPROPAGATE_FAKE_GPUS"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and result["step"] == 6
    resumed = result["resumed_from_step"]  # the last checkpoint before step 4: 2, or the stop's 3
    assert resumed in (2, 3) and [h["step"] for h in result["history"]] == list(range(resumed + 1, 7))
    for h in result["history"]:
        assert h["loss"] == pytest.approx(expected_loss(h["step"], config))

    events = _check_log(run_dir, config)
    starts = [e for e in events if e.type == "run_started"]
    assert [s.device for s in starts] == ["cpu,cpu"] * 3 and {s.backend for s in starts} == {"gloo x2"}
    assert starts[0].resumed_from_step is None and all(s.resumed_from_step for s in starts[1:])
    assert [e.code for e in events if e.type == "warning"] == ["RUNTIME_WORKER_CRASHED"]
    checkpoints = [e.step for e in events if e.type == "checkpoint"]
    assert len(checkpoints) == len(set(checkpoints))  # each written once, by rank 0
    assert (run_dir / "worker.rank1.log").exists()
    _check_shards(run_dir, config)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_complete_one_run(tmp_path):
    # Two torchrun agents, one rank each, meeting at a c10d rendezvous on the loopback: what two
    # workstations sharing the run folder do (docs/scaling.md).
    run_dir = tmp_path / "runs" / "two-nodes"
    run_dir.mkdir(parents=True)
    config = RunConfig(data=str(tmp_path / "d.jsonl"), steps=4, save_every=2, batch_size=5, grad_accum=1)
    config.save(run_dir / "config.json")
    env = {**os.environ, **_rank_env(), "BACKPROPAGATE_HOME": str(tmp_path / "home")}
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backpropagate.runs.launch",
                str(run_dir),
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv-endpoint",
                endpoint,
                "--nproc-per-node",
                "1",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [agent.communicate(timeout=120)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs
    events = _check_log(run_dir, config)
    assert [e.type for e in events if e.type in ("run_started", "completed")] == ["run_started", "completed"]
    assert next(e for e in events if e.type == "run_started").backend == "gloo x2"
    _check_shards(run_dir, config)
