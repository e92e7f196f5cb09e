"""TensorBoard: scalars under ``RUN_DIR/tensorboard/`` (``tensorboard --logdir RUN_DIR/tensorboard``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backpropagate.events import EventBase

STEP_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "reward_margin", "reward_accuracy", "kl")
EVAL_SCALARS = ("loss", "perplexity", "reward_margin", "reward_accuracy")


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def _open(self, purge_step: int | None) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        # After a resume, steps past the checkpoint are trained again: purge them so each step
        # has one point, as in the uninterrupted run.
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        return self.writer

    def on_event(self, event: EventBase) -> None:
        kind = event.type  # type: ignore[attr-defined]
        if kind == "run_started":
            resumed = event.resumed_from_step  # type: ignore[attr-defined]
            writer = self._open(resumed + 1 if resumed else None)
            writer.add_text("config", "```\n" + json.dumps(event.config, indent=2) + "\n```")  # type: ignore[attr-defined]
            return
        writer = self.writer or self._open(None)
        if kind == "step":
            for name in STEP_SCALARS:
                value = getattr(event, name, None)
                if value is not None:
                    writer.add_scalar(f"train/{name}", value, event.step)  # type: ignore[attr-defined]
        elif kind == "eval":
            for name in EVAL_SCALARS:
                value = getattr(event, name, None)
                if value is not None:
                    writer.add_scalar(f"eval/{name}", value, event.step)  # type: ignore[attr-defined]
        elif kind == "gpu":
            for device in event.devices:  # type: ignore[attr-defined]
                for name in ("temperature_c", "memory_used_mb", "utilization_pct", "power_w"):
                    value = getattr(device, name)
                    if value is not None:
                        writer.add_scalar(f"gpu{device.index}/{name}", value, _wall_step(event))
        elif kind == "completed":
            metrics = {k: v for k, v in (event.metrics or {}).items() if isinstance(v, int | float)}  # type: ignore[attr-defined]
            writer.add_text("final_metrics", "```\n" + json.dumps(metrics, indent=2) + "\n```")
        if kind in ("completed", "failed", "cancelled", "checkpoint"):
            writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _wall_step(event: EventBase) -> int:
    return int(event.seq)
