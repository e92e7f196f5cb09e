"""Metric series from a run's log, downsampled for charts without losing the curve's shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backpropagate.events import read_events

STEP_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s", "epoch", "reward_margin", "reward_accuracy")


def read_metrics(events_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Every ``step`` and ``eval`` point of a run, in order (a resumed run's repeated steps replaced)."""
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for event in read_events(events_path):
        kind = event.type  # type: ignore[attr-defined]
        if kind == "step":
            point = {"step": event.step, "ts": event.ts}  # type: ignore[attr-defined]
            point.update({k: getattr(event, k) for k in STEP_FIELDS})
            steps[event.step] = point  # type: ignore[attr-defined]
        elif kind == "eval":
            evals[event.step] = {  # type: ignore[attr-defined]
                "step": event.step,  # type: ignore[attr-defined]
                "ts": event.ts,
                "loss": event.loss,  # type: ignore[attr-defined]
                "perplexity": event.perplexity,  # type: ignore[attr-defined]
                "reward_accuracy": event.reward_accuracy,  # type: ignore[attr-defined]
            }
    return {"steps": [steps[k] for k in sorted(steps)], "eval": [evals[k] for k in sorted(evals)]}


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
