"""Held-out evaluation: token-weighted mean loss and perplexity, the model back in train mode after."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from backpropagate.data.packing import segments_to_mask
from backpropagate.training.data_order import label_tokens, split_micro_batches


def to_device(batch: dict[str, Any], device: Any, mask_dtype: Any = None) -> dict[str, Any]:
    """Move a collated batch to ``device``; packed rows' segment ids become their 4D mask there."""
    import torch

    moved = {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}
    return segments_to_mask(moved, mask_dtype or torch.float32)


def evaluate(
    model: Any,
    examples: Sequence[dict[str, Any]],
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]],
    *,
    batch_size: int,
    device: Any,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
    mask_dtype: Any = None,
) -> tuple[float, float]:
    """(loss, perplexity) over ``examples``, weighting each by its loss-carrying tokens.

    The model is put back in train mode in a ``finally``: an evaluation that raises must not
    leave dropout off (and the adapters frozen in eval behaviour) for the rest of the run.
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        total_loss, total_tokens = 0.0, 0
        with torch.no_grad():
            for chunk in split_micro_batches(list(examples), batch_size):
                tokens = sum(label_tokens(ex) for ex in chunk)
                if tokens == 0:
                    continue
                batch = to_device(collate_fn(chunk), device, mask_dtype)
                with autocast():
                    out = model(**batch, num_items_in_batch=tokens, use_cache=False)
                # With num_items_in_batch the model returns the summed loss over the chunk / tokens.
                total_loss += float(out.loss) * tokens
                total_tokens += tokens
        if total_tokens == 0:
            return float("nan"), float("nan")
        loss = total_loss / total_tokens
        return loss, math.exp(min(loss, 50.0))
    finally:
        if was_training:
            model.train()
