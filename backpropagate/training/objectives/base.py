"""What every objective's loss returns: the loss and the metrics it adds to step events."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ObjectiveLoss:
    """A batch's mean loss plus per-batch metrics (plain floats) for the step event."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Mean implicit rewards, their margin and how often chosen beats rejected."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "reward_accuracy": (chosen > rejected).float().mean().item(),
    }
