"""The training engine.

Entry point for every caller (the worker, `backprop train`, `Trainer`)::

    run_training(config: RunConfig, run_dir: Path, emit: Callable[[EventBase], None],
                 control: RunControl | None = None) -> TrainResult

It loads data and model, trains, checkpoints into ``run_dir/checkpoints/``, writes the adapter
to ``run_dir/adapter/`` (or ``config.output_dir``), resumes automatically from the last good
checkpoint found in ``run_dir``, and reports everything as events through ``emit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backpropagate.training.result import TrainResult
    from backpropagate.training.sft import run_training

__all__ = ["TrainResult", "run_training"]


def __getattr__(name: str) -> Any:
    # Lazy: the server imports training.control and must not pay for the engine's modules.
    if name == "run_training":
        from backpropagate.training.sft import run_training

        return run_training
    if name == "TrainResult":
        from backpropagate.training.result import TrainResult

        return TrainResult
    raise AttributeError(f"module 'backpropagate.training' has no attribute {name!r}")
