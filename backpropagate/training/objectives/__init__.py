"""Training objectives: each owns its loss (a pure function of per-sequence log-probs)."""

from __future__ import annotations

from .base import ObjectiveLoss, reward_metrics
from .dpo import dpo_loss
from .kto import kto_loss
from .orpo import orpo_loss
from .sft import sft_loss
from .simpo import simpo_loss

OBJECTIVES = {"sft": sft_loss, "dpo": dpo_loss, "orpo": orpo_loss, "simpo": simpo_loss, "kto": kto_loss}
PAIRWISE = frozenset({"dpo", "orpo", "simpo"})
NEEDS_REFERENCE = frozenset({"dpo", "kto"})

__all__ = [
    "NEEDS_REFERENCE",
    "OBJECTIVES",
    "PAIRWISE",
    "ObjectiveLoss",
    "dpo_loss",
    "kto_loss",
    "orpo_loss",
    "reward_metrics",
    "sft_loss",
    "simpo_loss",
]
