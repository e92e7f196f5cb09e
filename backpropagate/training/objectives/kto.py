"""KTO (Ethayarajh et al., 2024): unpaired desirable / undesirable responses.

r = log pi(y|x) - log ref(y|x);  z = max(0, KL estimate), not differentiated
  desirable:   w_d * (1 - sigma(beta (r - z)))
  undesirable: w_u * (1 - sigma(beta (z - r)))
The KL estimate is the batch mean of r (the paper uses mismatched prompt/response pairs;
the batch mean is the cheaper estimate of the same reference point).
"""

from __future__ import annotations

import torch

from .base import ObjectiveLoss


def kto_loss(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: torch.Tensor | None = None,
) -> ObjectiveLoss:
    """KTO loss on per-sequence summed log-probs; `desirable` is a bool tensor per row."""
    logratio = policy_logp - ref_logp
    if kl is None:
        kl = logratio.detach().mean()
    z = kl.detach().clamp(min=0)
    good = desirable.bool()
    losses = torch.where(
        good,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - logratio))),
    )
    rewards = (beta * logratio).detach().float()
    metrics: dict[str, float] = {"kl": z.item()}
    if good.any():
        metrics["chosen_reward"] = rewards[good].mean().item()
    if (~good).any():
        metrics["rejected_reward"] = rewards[~good].mean().item()
    if good.any() and (~good).any():
        metrics["reward_margin"] = metrics["chosen_reward"] - metrics["rejected_reward"]
    return ObjectiveLoss(loss=losses.mean(), metrics=metrics)
