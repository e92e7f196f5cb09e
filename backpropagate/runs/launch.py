"""The command line that starts a run's worker: one python process, or torchrun with one rank per GPU.

A single-process run is ``python -m backpropagate.worker RUN_DIR``. A run with several processes
(one per GPU, or CPU ranks under ``BACKPROPAGATE_DIST_BACKEND=gloo``), or one spread over several
machines, is the same worker under PyTorch's own launcher::

    torchrun --standalone --nproc-per-node N --max-restarts 0 -m backpropagate.worker RUN_DIR

``--standalone`` is a c10d rendezvous on the loopback whose port the store binds as port 0, so the
OS hands out a free one (no race between picking a port and binding it). With ``--max-restarts 0``
a rank that dies takes the group down at once: the run ends ``interrupted`` and is resumed from
its last checkpoint rather than restarted behind the scheduler's back. Across machines the
rendezvous flags pass through (:class:`Nodes`); every node runs this same command on the same run
folder (shared storage), e.g. ``python -m backpropagate.runs.launch RUN_DIR --nnodes 2 ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

WORKER_MODULE = "backpropagate.worker"


@dataclass(frozen=True)
class Nodes:
    """A run over several machines: torchrun's multi-node rendezvous, passed through as given."""

    nnodes: int
    node_rank: int
    rdzv_endpoint: str  # host:port that every node reaches (the first node's address)
    rdzv_id: str  # the same on every node; the run id by default
    rdzv_backend: Literal["c10d", "static"] = "c10d"

    def __post_init__(self) -> None:
        problems = []
        if self.nnodes < 1:
            problems.append(f"nnodes must be >= 1, not {self.nnodes}")
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            problems.append(f"node_rank must be in 0..{self.nnodes - 1}, not {self.node_rank}")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            problems.append(f"rdzv_endpoint must be HOST:PORT, not {self.rdzv_endpoint!r}")
        if problems:
            raise ValueError("; ".join(problems))


def torchrun_command(python: str | None = None) -> list[str]:
    """torchrun of the interpreter's environment (its script, else ``python -m torch.distributed.run``)."""
    python = python or sys.executable
    script = Path(python).parent / "torchrun"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [python, "-m", "torch.distributed.run"]


def uses_torchrun(processes: int, nodes: Nodes | None = None) -> bool:
    return processes > 1 or (nodes is not None and nodes.nnodes > 1)


def worker_command(
    run_dir: Path | str,
    processes: int = 1,
    *,
    nodes: Nodes | None = None,
    python: str | None = None,
    force_torchrun: bool = False,
) -> list[str]:
    """The command that trains ``run_dir`` with ``processes`` ranks on this machine.

    ``force_torchrun`` takes the torchrun path with a single rank (to check that path on one GPU).
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, not {processes}")
    python = python or sys.executable
    worker = ["-m", WORKER_MODULE, str(run_dir)]
    if not (force_torchrun or uses_torchrun(processes, nodes)):
        return [python, *worker]
    command = [*torchrun_command(python)]
    if nodes is None:
        command += ["--standalone"]
    else:
        command += [
            "--nnodes", str(nodes.nnodes),
            "--node-rank", str(nodes.node_rank),
            "--rdzv-backend", nodes.rdzv_backend,
            "--rdzv-endpoint", nodes.rdzv_endpoint,
            "--rdzv-id", nodes.rdzv_id,
        ]  # fmt: skip
    command += [
        "--nproc-per-node", str(processes),
        "--max-restarts", "0",
    ]  # fmt: skip
    return command + worker


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backpropagate.runs.launch",
        description="Train RUN_DIR (its config.json) on this machine's share of a torchrun group. "
        "Run it on every node with the same RUN_DIR (shared storage) and rendezvous.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--nproc-per-node", type=int, default=1, help="ranks on this machine (one per GPU)")
    parser.add_argument("--nnodes", type=int, default=1, help="machines in the group")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1")
    parser.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous on the first node")
    parser.add_argument("--rdzv-id", help="shared by every node (default: the run folder's name)")
    parser.add_argument("--rdzv-backend", choices=["c10d", "static"], default="c10d")
    parser.add_argument(
        "--print", action="store_true", help="print the torchrun command instead of running it"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run_dir = args.run_dir.resolve()
    if not (run_dir / "config.json").is_file():
        print(f"error: {run_dir}/config.json not found", file=sys.stderr)
        return 2
    nodes = None
    if args.nnodes > 1 or args.rdzv_endpoint:
        if not args.rdzv_endpoint:
            print("error: --nnodes > 1 needs --rdzv-endpoint HOST:PORT", file=sys.stderr)
            return 2
        try:
            nodes = Nodes(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id or run_dir.name,
                          args.rdzv_backend)  # fmt: skip
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    command = worker_command(run_dir, args.nproc_per_node, nodes=nodes, force_torchrun=True)
    if args.print:
        print(" ".join(command))
        return 0
    sys.stdout.flush()
    os.execv(command[0], command)  # torchrun takes this process's place: signals reach it directly
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
