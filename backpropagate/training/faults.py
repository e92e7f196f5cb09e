"""Fault injection, so that recovery paths run on machines without the fault (CPU test runs).

``BACKPROPAGATE_FAULT_OOM_AT_STEP=N`` raises ``torch.cuda.OutOfMemoryError`` inside optimizer step
N, ``BACKPROPAGATE_FAULT_OOM_TIMES=k`` times (default 1); ``BACKPROPAGATE_FAULT_EVAL_AT_STEP=N``
makes the evaluation at step N raise. In a group of ranks, ``BACKPROPAGATE_FAULT_RANK=R`` fires
the faults on rank R only (unset: on every rank). Unset, every check is one dict lookup.
"""

from __future__ import annotations

import os


class FaultInjector:
    """Reads the fault variables once per run and fires each fault the number of times asked."""

    def __init__(self, environ: dict[str, str] | None = None, rank: int | None = None) -> None:
        env = os.environ if environ is None else environ
        only = _int(env.get("BACKPROPAGATE_FAULT_RANK"))
        if rank is None:
            from backpropagate.training import distributed

            rank = distributed.rank()
        # Another rank's fault: this one never fires (the group still reacts to it as one).
        here = only is None or only == rank
        self.oom_step = _int(env.get("BACKPROPAGATE_FAULT_OOM_AT_STEP")) if here else None
        self.oom_left = _int(env.get("BACKPROPAGATE_FAULT_OOM_TIMES")) or 1
        self.eval_step = _int(env.get("BACKPROPAGATE_FAULT_EVAL_AT_STEP")) if here else None

    def maybe_oom(self, step: int) -> None:
        if self.oom_step == step and self.oom_left > 0:
            import torch

            self.oom_left -= 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected at step {step})")

    def maybe_fail_eval(self, step: int) -> None:
        if self.eval_step == step:
            raise RuntimeError(f"evaluation failure injected at step {step}")


def _int(text: str | None) -> int | None:
    return int(text) if text not in (None, "") else None
