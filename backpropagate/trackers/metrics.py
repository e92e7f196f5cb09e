"""What every tracker logs, taken from the events once: scalars by group and step, config, final metrics.

TensorBoard keeps its own tags (``train/loss``, ``eval/loss``, ``gpu0/temperature_c``); the other
sinks use the same names through :func:`scalars_of`, so a run reads the same in every tracker.
"""

from __future__ import annotations

import json
from typing import Any

from backpropagate.events import EventBase

STEP_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "reward_margin", "reward_accuracy", "kl")
EVAL_SCALARS = ("loss", "perplexity", "reward_margin", "reward_accuracy")
GPU_SCALARS = ("temperature_c", "memory_used_mb", "utilization_pct", "power_w")


def scalars_of(event: EventBase) -> tuple[str, int, dict[str, float]] | None:
    """``(group, step, {tag: value})`` for a step, eval or gpu event; None for any other kind.

    GPU samples carry no optimizer step: their x-axis is the event's ``seq``.
    """
    kind = getattr(event, "type", None)
    if kind == "step":
        group, step, names = "train", int(event.step), STEP_SCALARS  # type: ignore[attr-defined]
        values = {f"train/{n}": getattr(event, n) for n in names if getattr(event, n, None) is not None}
    elif kind == "eval":
        group, step, names = "eval", int(event.step), EVAL_SCALARS  # type: ignore[attr-defined]
        values = {f"eval/{n}": getattr(event, n) for n in names if getattr(event, n, None) is not None}
    elif kind == "gpu":
        group, step = "gpu", int(event.seq)
        values = {
            f"gpu{device.index}/{n}": getattr(device, n)
            for device in event.devices  # type: ignore[attr-defined]
            for n in GPU_SCALARS
            if getattr(device, n) is not None
        }
    else:
        return None
    return group, step, {k: float(v) for k, v in values.items()}


def final_metrics(event: EventBase) -> dict[str, float]:
    """The numeric final metrics of a ``completed`` event."""
    metrics = getattr(event, "metrics", None) or {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"a.b": "value"}`` text, for trackers whose parameters are flat strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        elif value is not None:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out
