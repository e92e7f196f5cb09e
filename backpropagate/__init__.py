"""Backpropagate: fine-tune language models on your own GPU.

Public API (heavy modules load lazily, so ``import backpropagate`` stays fast)::

    from backpropagate import Trainer, RunConfig, BackpropError, ErrorCode
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode

__version__ = "0.1.0"

if TYPE_CHECKING:
    from backpropagate.trainer import Trainer, TrainResult

__all__ = ["BackpropError", "ErrorCode", "RunConfig", "Trainer", "TrainResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "TrainResult"):
        from backpropagate import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'backpropagate' has no attribute {name!r}")
