"""The one reducer of a run's events: the store's row, the web app's view and the metrics API fold
the same typed events through here, so they cannot disagree on what a log means.

``fold_summary`` updates the run-level fields (status, progress, start and end, error, final
metrics) of anything that has them: the store's ``Run`` row, or a :class:`RunFold`. A ``RunFold``
also keeps the series a chart needs (steps, evals, checkpoints, the last GPU sample); ``downsample``
bounds a series for a chart without losing its spikes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from backpropagate.events import (
    Cancelled,
    Checkpoint,
    Completed,
    Eval,
    EventBase,
    Failed,
    Gpu,
    OomRecovered,
    Paused,
    Resumed,
    RunStarted,
    RunStatus,
    Status,
    Step,
)

# The fields of a step point (besides ``step`` and ``ts``), as the metrics API serves them.
STEP_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s", "epoch", "reward_margin", "reward_accuracy")


class Summary(Protocol):
    """What ``fold_summary`` writes: the store's Run row and RunFold both have these fields."""

    status: RunStatus
    last_seq: int
    step: int
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    started_at: float | None
    ended_at: float | None
    pid: int | None
    exit_code: int | None
    error_code: str | None
    error_message: str | None
    final_metrics: dict[str, Any]


def fold_summary(run: Summary, event: EventBase) -> None:
    """Fold one event into the run-level fields (the caller skips events it has already seen)."""
    run.last_seq = max(run.last_seq, event.seq)
    if isinstance(event, RunStarted):
        run.status = RunStatus.RUNNING
        run.started_at = event.ts
        run.ended_at = None
        run.pid = event.pid
        run.exit_code = run.error_code = run.error_message = None
        if event.total_steps:
            run.total_steps = event.total_steps
    elif isinstance(event, Status):
        if event.status != RunStatus.QUEUED:  # queued is the scheduler's word, never the log's
            run.status = event.status
    elif isinstance(event, Step):
        run.step, run.total_steps = event.step, event.total_steps
        run.loss, run.tokens_per_s = event.loss, event.tokens_per_s
    elif isinstance(event, Paused):
        run.status = RunStatus.PAUSED
    elif isinstance(event, Resumed):
        run.status = RunStatus.RUNNING
    elif isinstance(event, Completed):
        run.status, run.ended_at = RunStatus.COMPLETED, event.ts
        metrics: dict[str, Any] = dict(event.metrics)
        for key in ("final_loss", "eval_loss", "runtime_s"):
            if getattr(event, key) is not None:
                metrics[key] = getattr(event, key)
        run.final_metrics = metrics
        run.step = event.step or run.step
    elif isinstance(event, Failed):
        run.status, run.ended_at = RunStatus.FAILED, event.ts
        run.error_code, run.error_message, run.exit_code = event.code, event.message, event.exit_code
    elif isinstance(event, Cancelled):
        run.status, run.ended_at = RunStatus.CANCELLED, event.ts


@dataclass
class RunFold:
    """A run's events folded: the summary fields plus chart series; ``apply`` is idempotent per seq."""

    run_id: str = ""
    last_seq: int = 0
    status: RunStatus = RunStatus.QUEUED
    phase: str = ""
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    micro_batch: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    pid: int | None = None
    exit_code: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    final_metrics: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    backend: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    gpu_devices: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, event: EventBase) -> bool:
        """Fold one event in; False when it was already seen (seq not after the last one)."""
        if event.seq and event.seq <= self.last_seq:
            return False
        fold_summary(self, event)
        if isinstance(event, RunStarted):
            self.device = event.device or self.device
            self.backend = event.backend or self.backend
            self.config = event.config or self.config
        elif isinstance(event, Status):
            self.phase = event.phase or ""
        elif isinstance(event, Step):
            self.lr, self.grad_norm = event.lr, event.grad_norm
            self.micro_batch = event.micro_batch or self.micro_batch
            # A resumed run repeats the steps after its checkpoint: the newer value replaces the older.
            while self.steps and self.steps[-1]["step"] >= event.step:
                self.steps.pop()
            point = {"step": event.step, "ts": event.ts}
            point.update({k: getattr(event, k) for k in STEP_FIELDS})
            self.steps.append(point)
        elif isinstance(event, Eval):
            while self.evals and self.evals[-1]["step"] >= event.step:
                self.evals.pop()
            self.evals.append(
                {
                    "step": event.step,
                    "ts": event.ts,
                    "loss": event.loss,
                    "perplexity": event.perplexity,
                    "reward_accuracy": event.reward_accuracy,
                }
            )
        elif isinstance(event, Gpu):
            self.gpu_devices = [d.model_dump() for d in event.devices]
        elif isinstance(event, Checkpoint):
            self.checkpoints.append({"step": event.step, "path": event.path, "bytes": event.bytes})
        elif isinstance(event, OomRecovered):
            self.micro_batch = event.new_micro_batch
        return True

    def apply_all(self, events: Iterable[EventBase]) -> RunFold:
        for event in events:
            self.apply(event)
        return self


def downsample(points: list[dict[str, Any]], max_points: int, key: str = "loss") -> list[dict[str, Any]]:
    """At most ~``max_points`` points: first and last kept, and each bucket's min and max of ``key``.

    Keeping both extremes of every bucket (in step order) preserves spikes that averaging would
    flatten. ``max_points <= 0`` or a short series returns everything.
    """
    n = len(points)
    if max_points <= 0 or n <= max_points:
        return list(points)
    if max_points < 4:
        return [points[0], points[-1]][:max_points]
    buckets = (max_points - 2) // 2
    inner = points[1:-1]
    size = len(inner) / buckets
    out = [points[0]]
    for b in range(buckets):
        chunk = inner[int(b * size) : int((b + 1) * size)]
        if not chunk:
            continue
        valued = [p for p in chunk if p.get(key) is not None] or chunk
        lo = min(valued, key=lambda p: p.get(key) if p.get(key) is not None else 0)
        hi = max(valued, key=lambda p: p.get(key) if p.get(key) is not None else 0)
        out.extend(sorted({id(lo): lo, id(hi): hi}.values(), key=lambda p: p["step"]))
    out.append(points[-1])
    return out
