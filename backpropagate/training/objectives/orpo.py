"""ORPO (Hong et al., 2024): SFT on the chosen response plus an odds-ratio term, no reference.

odds(y|x) = P / (1 - P) with P = exp(mean token log-prob of y)
L = NLL(y_w) - lambda * log sigma(log odds(y_w|x) - log odds(y_l|x))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ObjectiveLoss, reward_metrics


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) for P = exp(mean_logp) < 1."""
    return mean_logp - torch.log1p(-torch.exp(mean_logp).clamp(max=1 - 1e-6))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    orpo_lambda: float = 0.1,
) -> ObjectiveLoss:
    """ORPO loss on per-sequence summed log-probs and response lengths (tokens)."""
    chosen_mean = policy_chosen / chosen_len.clamp(min=1)
    rejected_mean = policy_rejected / rejected_len.clamp(min=1)
    nll = -chosen_mean
    odds_ratio = -F.logsigmoid(_log_odds(chosen_mean) - _log_odds(rejected_mean))
    losses = nll + orpo_lambda * odds_ratio
    metrics = reward_metrics(orpo_lambda * chosen_mean, orpo_lambda * rejected_mean)
    metrics["nll"] = nll.detach().mean().item()
    return ObjectiveLoss(loss=losses.mean(), metrics=metrics)
