"""One-process torchrun run of the real worker, stopped and resumed, against a plain worker run.

The group path (process group, sharding, gradient reduction, rank-0 checkpoints) is the one a
multi-GPU run takes; with one rank on one GPU it must give the plain run's curve. Prints a table;
``--backend gloo`` runs it on the CPU.

    python bench/torchrun_check.py [--steps 40] [--stop-at 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def make_run(root: Path, name: str, steps: int, device: str) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {
        "model": "demo", "data": str(REPO / "examples" / "quickstart.jsonl"), "steps": steps,
        "save_every": 10, "log_every": 1, "batch_size": 2, "grad_accum": 2, "lr": 2e-3, "seed": 3,
        "eval_fraction": 0.0, "device": device, "lora_dropout": 0.0,
    }  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def torchrun(run_dir: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "--max-restarts", "0", "-m", "backpropagate.worker", str(run_dir)]  # fmt: skip
    log = (run_dir / "launcher.log").open("a")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--stop-at", type=int, default=20)
    p.add_argument("--backend", default="auto", help="auto (nccl on a GPU) or gloo")
    args = p.parse_args()
    env = {
        **os.environ,
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    if args.backend == "gloo":
        env["BACKPROPAGATE_DIST_BACKEND"] = "gloo"
    device = "cpu" if args.backend == "gloo" else "cuda"
    root = Path(tempfile.mkdtemp(prefix="torchrun-check-"))
    env.setdefault("BACKPROPAGATE_HOME", str(root / "home"))

    plain = make_run(root, "plain", args.steps, device)
    subprocess.run([sys.executable, "-m", "backpropagate.worker", str(plain)], env=env, check=False)

    group = make_run(root, "group", args.steps, device)
    first = torchrun(group, env)
    target = group / "checkpoints" / f"step-{args.stop_at:06d}"
    deadline = time.time() + 300
    while not target.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGTERM)  # a stop, as the scheduler sends it
    first.wait(timeout=120)
    stopped = events(group)
    second = torchrun(group, env)
    second.wait(timeout=300)
    resumed = events(group)

    plain_steps = {e["step"]: e["loss"] for e in events(plain) if e["type"] == "step"}
    group_steps = {e["step"]: e["loss"] for e in resumed if e["type"] == "step"}
    diff = max((abs(plain_steps[s] - group_steps[s]) for s in plain_steps if s in group_steps), default=None)
    starts = [e for e in resumed if e["type"] == "run_started"]
    log = (group / "launcher.log").read_text()
    rows = {
        "joined": [ln for ln in log.splitlines() if "joined the process group" in ln][:2],
        "world_size": [s.get("world_size") for s in starts],
        "devices": [s.get("devices") for s in starts],
        "first launch ended": next(
            (e["type"] for e in reversed(stopped) if e["type"] in ("cancelled", "failed")), None
        ),
        "resumed_from_step": [s.get("resumed_from_step") for s in starts],
        "final": resumed[-1]["type"] if resumed else None,
        "steps (plain / group)": f"{len(plain_steps)} / {len(group_steps)}",
        "max |loss difference|": diff,
        "launcher exit codes": [first.returncode, second.returncode],
    }
    for key, value in rows.items():
        print(f"{key:24} {value}")


if __name__ == "__main__":
    main()
