"""TrainResult: what a finished (or stopped) training run hands back to its caller."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class TrainResult:
    """The outcome of ``run_training``; ``Trainer.train`` returns the same object."""

    status: Literal["completed", "cancelled"]
    run_id: str
    run_dir: Path
    step: int
    total_steps: int
    final_loss: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    adapter_path: Path | None = None
    checkpoint: Path | None = None
    resumed_from_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("run_dir", "adapter_path", "checkpoint"):
            out[key] = None if out[key] is None else str(out[key])
        return out
