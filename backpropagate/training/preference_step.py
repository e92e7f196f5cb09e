"""A micro-batch's loss for the preference objectives (DPO, ORPO, SimPO, KTO).

The loop stays the same for every objective: it asks this module for the loss of a chunk of
rows and backpropagates it. Here a chunk of pairs becomes one forward pass over chosen and
rejected sequences side by side (2 x rows), each sequence's response log-probability is summed
over its labels, and the objective's loss (``training/objectives``) turns those into a scalar.

DPO and KTO compare against a reference model. With LoRA/QLoRA the reference is the base model
itself: the same forward pass with the adapter switched off (``disable_adapter``), without
gradients. No second copy of the weights is loaded, and because the base weights never change the
reference of a resumed run is the one the uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from backpropagate.training.data_order import split_micro_batches
from backpropagate.training.evaluation import to_device
from backpropagate.training.objectives import (
    NEEDS_REFERENCE,
    PAIRWISE,
    ObjectiveLoss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

IGNORE = -100
# What a step event may carry beside the loss; an objective's other numbers stay in its module.
STEP_METRICS = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward", "kl")


def sequence_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Per row: the summed log-probability of the label tokens, and how many there are.

    Position t predicts token t + 1, so logits and labels are shifted against each other. The
    log-softmax is taken in float32: bf16 sums over a vocabulary lose the digits DPO compares.
    """
    import torch

    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)
    picked = torch.gather(logits, 2, safe.unsqueeze(2)).squeeze(2) - torch.logsumexp(logits, dim=-1)
    return (picked * mask).sum(-1), mask.sum(-1)


# Response positions per chunk of the LM head: [positions, vocab] float32 logits exist one chunk at
# a time (1024 x 152k x 4 B = 0.6 GB), recomputed in backward instead of kept. Measured on an H200
# (0.5B shape, 8 sequences of ~1200 tokens): 4096 peaked 1.3x TRL's memory.
HEAD_CHUNK = 1024


def _split_head(model: Any) -> tuple[Any, Any] | None:
    """(backbone, lm_head) of a causal LM, through a PEFT wrapper; None when the layout is unknown."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, "model", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    cap = getattr(getattr(inner, "config", None), "final_logit_softcapping", None)
    if backbone is None or head is None or cap or not callable(backbone):
        return None  # e.g. Gemma 2's capped logits: the model's own forward knows its transforms
    return backbone, head


def _picked_logps(hidden: Any, head: Any, targets: Any) -> Any:
    import torch

    logits = head(hidden).float()
    return torch.gather(logits, 1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


def response_logps(model: Any, batch: dict[str, Any], labels: Any) -> tuple[Any, Any]:
    """What ``sequence_logps`` returns, without materialising the logits of every position.

    The LM head runs on the response positions only (the prompt's logits are never used), in
    chunks, each recomputed in backward: a [rows, length, vocab] float32 tensor is the largest
    thing a preference step would otherwise hold (about 6 GB for 8 sequences of 1200 tokens on a
    152k vocabulary). Models whose layout is unknown take the plain path.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    parts = _split_head(model)
    if parts is None:
        return sequence_logps(model(**batch, use_cache=False).logits, labels)
    backbone, head = parts
    hidden = backbone(**batch, use_cache=False).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    picked_hidden, picked_targets = hidden[mask], targets[mask]
    pieces = []
    for start in range(0, picked_targets.shape[0], HEAD_CHUNK):
        h = picked_hidden[start : start + HEAD_CHUNK]
        t = picked_targets[start : start + HEAD_CHUNK]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_picked_logps, h, head, t, use_reentrant=False))
        else:
            pieces.append(_picked_logps(h, head, t))
    picked = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(mask.shape[0], device=picked.device, dtype=torch.float32).index_add(0, rows, picked)
    return sums, mask.sum(-1)


@dataclass
class PreferenceLoss:
    """The loss of a chunk of preference rows for ``config.objective``."""

    config: Any  # RunConfig
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    device: Any
    mask_dtype: Any = None
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext

    def __call__(self, model: Any, chunk: Sequence[dict[str, Any]]) -> ObjectiveLoss:
        import torch

        objective = self.config.objective
        sequences = _sequences(chunk, pairwise=objective in PAIRWISE)
        batch = to_device(self.collate(sequences), self.device, self.mask_dtype)
        labels = batch.pop("labels")
        with self.autocast():
            logp, n_tokens = response_logps(model, batch, labels)
        ref = None
        if objective in NEEDS_REFERENCE:
            with torch.no_grad(), model.disable_adapter(), self.autocast():
                ref, _ = response_logps(model, batch, labels)
        return self._loss(chunk, logp, n_tokens, ref)

    def _loss(self, chunk: Sequence[dict[str, Any]], logp: Any, n_tokens: Any, ref: Any) -> ObjectiveLoss:
        import torch

        c, objective = self.config, self.config.objective
        if objective == "kto":
            desirable = torch.tensor([bool(row["desirable"]) for row in chunk], device=logp.device)
            return kto_loss(
                logp,
                ref,
                desirable,
                beta=c.beta,
                desirable_weight=c.kto_desirable_weight,
                undesirable_weight=c.kto_undesirable_weight,
            )
        n = len(chunk)  # rows 0..n-1 are the chosen sides, n..2n-1 the rejected ones
        chosen, rejected = logp[:n], logp[n:]
        if objective == "dpo":
            return dpo_loss(
                chosen,
                rejected,
                ref[:n],
                ref[n:],
                beta=c.beta,
                loss_type=c.dpo_loss_type,
                label_smoothing=c.label_smoothing,
                chosen_len=n_tokens[:n],
                rejected_len=n_tokens[n:],
            )
        if objective == "orpo":
            return orpo_loss(chosen, rejected, n_tokens[:n], n_tokens[n:], orpo_lambda=c.orpo_lambda)
        if objective == "simpo":
            return simpo_loss(
                chosen,
                rejected,
                n_tokens[:n],
                n_tokens[n:],
                beta=c.simpo_beta,
                gamma_beta_ratio=c.simpo_gamma,
            )
        raise ValueError(f"not a preference objective: {objective!r}")


def _sequences(chunk: Sequence[dict[str, Any]], *, pairwise: bool) -> list[dict[str, list[int]]]:
    if not pairwise:
        return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in chunk]
    chosen = [{"input_ids": r["chosen_input_ids"], "labels": r["chosen_labels"]} for r in chunk]
    rejected = [{"input_ids": r["rejected_input_ids"], "labels": r["rejected_labels"]} for r in chunk]
    return chosen + rejected


class MetricMean:
    """Row-weighted means of the metrics of a step's micro-batches."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._rows: dict[str, int] = {}

    def add(self, metrics: dict[str, float], rows: int) -> None:
        for key, value in metrics.items():
            if key in STEP_METRICS:
                self._sums[key] = self._sums.get(key, 0.0) + value * rows
                self._rows[key] = self._rows.get(key, 0) + rows

    def means(self) -> dict[str, float]:
        return {k: self._sums[k] / self._rows[k] for k in self._sums}


def evaluate_preference(
    model: Any, rows: Sequence[dict[str, Any]], loss: PreferenceLoss, batch_size: int
) -> tuple[float, dict[str, float]]:
    """Mean objective loss and reward metrics over held-out rows; the model back in train mode after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        total, count, metrics = 0.0, 0, MetricMean()
        with torch.no_grad():
            for chunk in split_micro_batches(list(rows), batch_size):
                out = loss(model, chunk)
                total += float(out.loss) * len(chunk)
                count += len(chunk)
                metrics.add(out.metrics, len(chunk))
        return (total / count if count else float("nan")), metrics.means()
    finally:
        if was_training:
            model.train()
