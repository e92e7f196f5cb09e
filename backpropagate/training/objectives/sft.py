"""Supervised fine-tuning: mean negative log-likelihood of the response tokens."""

from __future__ import annotations

import torch

from .base import ObjectiveLoss


def sft_loss(logp_sum: torch.Tensor, n_tokens: torch.Tensor) -> ObjectiveLoss:
    """-sum(log p(response)) / number of response tokens."""
    return ObjectiveLoss(loss=-logp_sum.sum() / n_tokens.sum().clamp(min=1))
