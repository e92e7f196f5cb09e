"""Placement: which GPUs a queued run gets, or the reason it waits. Pure logic, no processes.

The scheduler asks :meth:`Placer.place` for the head of its queue (first in, first out: a run
never overtakes an earlier one, so a large request cannot starve), :meth:`Placer.take` when it
starts the run and :meth:`Placer.release` when the worker is gone. A request comes from a run's
config (:func:`request_for`): ``gpus`` as a count or ``all``, or exact ``gpu_ids``; a CPU run
holds one of the CPU slots instead of GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode


@dataclass(frozen=True)
class Request:
    """What one run needs: ``count`` GPUs (0 = a CPU run), optionally exactly ``ids``."""

    count: int
    ids: tuple[int, ...] | None = None
    # Ranks to launch: one per GPU; a CPU run has more than one only under the gloo switch.
    processes: int = 1

    @property
    def cpu(self) -> bool:
        return self.count == 0

    def describe(self) -> str:
        if self.cpu:
            return "a CPU slot" if self.processes == 1 else f"a CPU slot ({self.processes} CPU ranks)"
        if self.ids is not None:
            return ("GPU " if len(self.ids) == 1 else "GPUs ") + ", ".join(map(str, self.ids))
        return "1 GPU" if self.count == 1 else f"{self.count} GPUs"


def request_for(config: Mapping[str, Any], inventory: Sequence[int], *, cpu_ranks: bool = False) -> Request:
    """The request of a run config (``RunConfig.model_dump()``) on a machine with ``inventory`` GPUs.

    With ``device: auto`` on a machine without GPUs the run trains on the CPU, whatever ``gpus``
    says; ``cpu_ranks`` (the gloo testing switch) then turns ``gpus: N`` into N CPU ranks.
    """
    device = config.get("device", "auto")
    gpus = config.get("gpus", 1)
    ids = config.get("gpu_ids")
    if device == "cpu" or gpus == 0 or (not inventory and device != "cuda"):
        wanted = len(ids) if ids else gpus if isinstance(gpus, int) else 1
        return Request(0, processes=max(wanted, 1) if cpu_ranks else 1)
    if ids:
        return Request(len(ids), tuple(int(i) for i in ids), processes=len(ids))
    count = (len(inventory) or 1) if gpus == "all" else int(gpus)  # "all" of none: refused later
    return Request(count, processes=count)


def check_request(request: Request, inventory: Sequence[int]) -> None:
    """Refuse at submission a request this machine can never meet (it would wait forever)."""
    if request.cpu:
        return
    have = list(inventory)
    if not have:
        raise BackpropError(
            ErrorCode.DEP_GPU_NOT_AVAILABLE,
            f"The run asks for {request.describe()} but this server sees no GPU.",
            hint="Set device to 'cpu' (or gpus to 0) to train on the CPU.",
        )
    missing = [i for i in request.ids or () if i not in have]
    if request.count > len(have) or missing:
        what = f"GPU index(es) {missing}" if missing else request.describe()
        raise BackpropError(
            ErrorCode.CONFIG_GPUS_UNAVAILABLE,
            f"The run asks for {what} but this machine has GPU(s) {have}.",
            hint=f"Ask for at most {len(have)} GPU(s), or gpu_ids among {have}.",
            gpus_requested=request.count,
            gpus_available=len(have),
        )


def behind(head: str) -> str:
    """Why a run that would fit still waits: an earlier run waits at the head of the queue."""
    return f"queued behind run {head} (runs start in the order they were queued)"


@dataclass
class Placer:
    """The machine's GPUs and CPU slots, and which run holds what."""

    inventory: list[int]
    cpu_slots: int = 1
    held: dict[str, list[int]] = field(default_factory=dict)  # run id -> its GPUs ([] = a CPU slot)

    def free(self) -> list[int]:
        used = {i for gpus in self.held.values() for i in gpus}
        return [i for i in self.inventory if i not in used]

    def cpu_runs(self) -> list[str]:
        return [run_id for run_id, gpus in self.held.items() if not gpus]

    def place(self, request: Request) -> tuple[list[int] | None, str | None]:
        """The GPUs the run would start on now ([] for a CPU run), or None and what it waits for."""
        if request.cpu:
            busy = self.cpu_runs()
            if len(busy) < self.cpu_slots:
                return [], None
            return None, (
                f"waiting for a CPU slot: {len(busy)} of {self.cpu_slots} in use "
                f"({self._holders(busy)}; BACKPROPAGATE_SERVER__MAX_CONCURRENT_RUNS allows more)"
            )
        free = self.free()
        if request.ids is not None:
            taken = [i for i in request.ids if i not in free]
            if not taken:
                return list(request.ids), None
            return None, f"waiting for {request.describe()}: {self._gpu_holders(taken)}"
        if request.count <= len(free):
            return free[: request.count], None
        busy = [i for i in self.inventory if i not in free]
        return None, (
            f"waiting for {request.describe()}: {len(free)} of {len(self.inventory)} free "
            f"({self._gpu_holders(busy)})"
        )

    def take(self, run_id: str, gpus: Sequence[int]) -> None:
        clash = set(gpus) - set(self.free())
        if clash or run_id in self.held:
            raise ValueError(f"run {run_id} cannot take GPUs {sorted(clash) or list(gpus)}: already held")
        self.held[run_id] = list(gpus)

    def release(self, run_id: str) -> None:
        self.held.pop(run_id, None)

    def plan(
        self, queue: Sequence[tuple[str, Request]]
    ) -> tuple[list[tuple[str, list[int]]], dict[str, str]]:
        """Starts for a whole queue, in order, and the reason each run that stays queued waits.

        Does not change what is held (the scheduler takes as it starts each run).
        """
        trial = Placer(list(self.inventory), self.cpu_slots, dict(self.held))
        starts: list[tuple[str, list[int]]] = []
        waiting: dict[str, str] = {}
        blocked: str | None = None
        for run_id, request in queue:
            if blocked is not None:
                waiting[run_id] = behind(blocked)
                continue
            gpus, reason = trial.place(request)
            if gpus is None:
                waiting[run_id] = reason or "waiting"
                blocked = run_id
                continue
            trial.take(run_id, gpus)
            starts.append((run_id, gpus))
        return starts, waiting

    def _gpu_holders(self, indices: Sequence[int]) -> str:
        by_gpu = {i: run_id for run_id, gpus in self.held.items() for i in gpus}
        return ", ".join(f"GPU {i}: run {by_gpu[i]}" for i in indices if i in by_gpu) or "none held"

    @staticmethod
    def _holders(run_ids: Sequence[str]) -> str:
        return ", ".join(f"run {r}" for r in run_ids)
