"""Rank-side helpers for runs that torchrun launched: the process group, who is who, shards, agreement,
the gradient exchange and each rank's RNG.

Every helper also works in a plain single process (a world of one, no torch.distributed), so the
training loop calls them unconditionally. The group uses NCCL on GPUs and gloo on the CPU or when
``BACKPROPAGATE_DIST_BACKEND=gloo`` (the testing switch: CPU ranks on a machine without GPUs).
Every collective has a timeout: a rank that died or hangs makes the others raise, never wait forever.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from backpropagate.training.control import RunControl

T = TypeVar("T")

# Long enough for a checkpoint write or an evaluation on rank 0 while the others wait at the
# next collective; short enough that a dead rank ends the run in minutes, not NCCL's default 10.
DEFAULT_TIMEOUT_S = 300.0
PAUSE_POLL_S = 0.5  # how often a paused group asks its ranks whether to go on


def launched() -> bool:
    """Whether this process is one rank of a group (torchrun, or RANK/WORLD_SIZE set by hand)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend_name(cuda_available: bool | None = None) -> str:
    """``nccl`` or ``gloo``: the setting when given, else NCCL when this process sees a GPU."""
    from backpropagate.settings import Settings

    choice = Settings().dist_backend  # read afresh: the launcher's environment decides
    if choice != "auto":
        return choice
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "nccl" if cuda_available else "gloo"


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the launcher's process group once; False (and nothing done) in a plain process."""
    if not launched():
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    backend = backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        # One GPU per rank: torchrun gives each rank its LOCAL_RANK among CUDA_VISIBLE_DEVICES.
        torch.cuda.set_device(local_rank())
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return True


def is_initialized() -> bool:
    if not launched():
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the whole group (0 in a plain process)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    """Ranks in the group, over every node (1 in a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def local_rank() -> int:
    """This process's rank on its machine: the index of its GPU among CUDA_VISIBLE_DEVICES."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Rank 0: the one that writes events, checkpoints and the adapter."""
    return rank() == 0


def device_name() -> str:
    """Where this rank trains: its own GPU under NCCL, the CPU under gloo."""
    if launched():
        return f"cuda:{local_rank()}" if backend_name() == "nccl" else "cpu"
    return "cpu"


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of one optimizer step's examples: items r, r+W, r+2W, ...

    Deterministic (it depends on the list and the rank only), disjoint between ranks, and the
    ranks' shares together are the whole list, so the step sees the same examples as on one GPU.
    Shares differ in length by at most one; see :func:`shard_size`.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside a world of {w}")
    return list(items[r::w])


def shard_size(count: int, world: int | None = None) -> int:
    """The longest share of ``count`` items: every rank runs as many micro-batches as this needs."""
    w = world_size() if world is None else world
    return math.ceil(count / w) if count else 0


def _reduce(value: float, op: str) -> float:
    import torch
    import torch.distributed as dist

    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=where)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return float(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: one rank's stop, OOM or hot GPU acts on all.

    Every rank must call it at the same point of the loop (it is a collective).
    """
    if not is_initialized():
        return bool(flag)
    return _reduce(1.0 if flag else 0.0, "MAX") > 0


def every_rank(flag: bool) -> bool:
    """True on every rank when it is true on all of them."""
    if not is_initialized():
        return bool(flag)
    return _reduce(1.0 if flag else 0.0, "MIN") > 0


def sum_ranks(value: float) -> float:
    """The sum of ``value`` over the ranks (token counts, summed losses for the step event)."""
    if not is_initialized():
        return float(value)
    return _reduce(value, "SUM")


def sum_each(values: Sequence[float]) -> list[float]:
    """Each of ``values`` summed over the ranks, in one collective (a step's loss and metric sums)."""
    if not is_initialized():
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_where())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (a decision taken once: the new micro-batch size, ...)."""
    if not is_initialized():
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (each rank's device for run_started)."""
    if not is_initialized():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# Gradients travel in flat buckets of about this size: few collectives, bounded extra memory.
BUCKET_BYTES = 64 * 2**20


def _where() -> Any:
    """Where a collective's small tensors live: the rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        import torch

        return torch.device("cuda", torch.cuda.current_device())
    return "cpu"


def sum_gradients(params: Sequence[Any], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace each parameter's ``.grad`` by its sum over the ranks (a no-op in a plain process).

    Called once per optimizer step, after every backward pass of the step on every rank (unlike
    DDP, which reduces inside the last backward): a rank that ran out of memory mid-step has then
    already told the group, and no rank is left waiting inside a gradient exchange. A parameter
    that got a gradient on some ranks only counts as zero on the others; one that got none
    anywhere keeps ``grad=None``, as in a one-process step (the optimizer skips it).
    """
    if not is_initialized():
        return
    import torch
    import torch.distributed as dist

    params = [p for p in params if p.requires_grad]
    if not params:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=_where())
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    used = [p for p, flag in zip(params, present.tolist(), strict=True) if flag > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(used, bucket_bytes):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def _buckets(params: list[Any], bucket_bytes: int) -> list[list[Any]]:
    """Consecutive parameters of one device and dtype, up to ``bucket_bytes`` of gradient each."""
    out: list[list[Any]] = []
    size, key = 0, None
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        this = (p.grad.device, p.grad.dtype)
        if not out or this != key or size + nbytes > bucket_bytes:
            out.append([])
            size, key = 0, this
        out[-1].append(p)
        size += nbytes
    return out


def broadcast_parameters(params: Sequence[Any], src: int = 0) -> None:
    """Rank ``src``'s values of ``params`` on every rank: the group starts from one set of weights."""
    if not is_initialized():
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


def hold(control: RunControl) -> bool:
    """Wait while paused; whether to stop now (the training loop asks between optimizer steps).

    In a group the ranks decide together: one rank's stop stops all of them at the same step,
    and one rank paused (a hot GPU) holds every rank until it resumes.
    """
    if not is_initialized():
        if not control.stop_requested:
            control.wait_while_paused()
        return control.stop_requested
    while True:  # every rank runs the same collectives, in the same order, until they agree
        if any_rank(control.stop_requested):
            return True
        if not any_rank(control.paused):
            return False
        time.sleep(PAUSE_POLL_S)


def seed_rank(seed: int, step: int) -> None:
    """Ranks after the first draw their own dropout masks (rank 0 keeps the one-process stream)."""
    if not is_initialized() or rank() == 0:
        return
    import numpy as np
    import torch

    torch.manual_seed(int(np.random.default_rng([seed, rank(), step]).integers(2**62)))


def rng_state() -> dict[str, str]:
    """This rank's torch RNG states as text, for the checkpoint's state.json."""
    import torch

    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def set_rng_state(saved: dict[str, str]) -> None:
    """Restore what :func:`rng_state` saved on this rank."""
    import torch

    def tensor(text: str) -> Any:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(saved["torch"]))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(saved["cuda"]))


def barrier() -> None:
    """Wait until every rank gets here (e.g. rank 0 finished writing a checkpoint)."""
    if not is_initialized():
        return
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[local_rank()])
    else:
        dist.barrier()


def teardown() -> None:
    """Leave the group (at the end of the run, whatever way it ends); safe to call twice."""
    if not is_initialized():
        return
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # a group broken by a dead rank cannot be torn down cleanly
        dist.destroy_process_group()
