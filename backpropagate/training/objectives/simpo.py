"""SimPO (Meng et al., 2024): reference-free, length-averaged rewards with a target margin.

L = -log sigma(beta / |y_w| log pi(y_w|x) - beta / |y_l| log pi(y_l|x) - gamma),  gamma = ratio * beta
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ObjectiveLoss, reward_metrics


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
) -> ObjectiveLoss:
    """SimPO loss on per-sequence summed log-probs and response lengths (tokens)."""
    chosen_reward = beta * policy_chosen / chosen_len.clamp(min=1)
    rejected_reward = beta * policy_rejected / rejected_len.clamp(min=1)
    gamma = gamma_beta_ratio * beta
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return ObjectiveLoss(loss=losses.mean(), metrics=reward_metrics(chosen_reward, rejected_reward))
