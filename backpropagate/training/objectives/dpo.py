"""Direct Preference Optimization (Rafailov et al., 2023) and its IPO / hinge variants.

h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
  sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)   (eps > 0: conservative DPO)
  ipo:     (h' - 1 / (2 beta))^2, h' with each log-ratio divided by its response's tokens
  hinge:   max(0, 1 - beta h)
IPO's per-token average keeps the squared loss from growing with response length; it is the
form the IPO authors' results use (and TRL's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ObjectiveLoss, reward_metrics


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
) -> ObjectiveLoss:
    """DPO loss on per-sequence summed log-probs of the responses (IPO needs their lengths too)."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("the IPO loss needs the response lengths")
        h_avg = chosen_logratio / chosen_len.clamp(min=1) - rejected_logratio / rejected_len.clamp(min=1)
        losses = (h_avg - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    metrics = reward_metrics(beta * chosen_logratio, beta * rejected_logratio)
    return ObjectiveLoss(loss=losses.mean(), metrics=metrics)
