"""Pack tokenized examples into full-length sequences and collate batches into tensors.

A packed sequence concatenates whole examples; ``position_ids`` restart at 0 for each one and
``seq_lens`` records their lengths, so attention stays inside each example. :func:`collate`
turns a batch into tensors: for packed rows a block-diagonal causal 4D mask (any attention
implementation, any device), the segment ids to build that mask on the device, or, with
``attention="position_ids"``, no mask at all: transformers then finds the example boundaries
from the position ids itself, which it only does when the forward pass gets no attention mask
and no cache (call the model with ``use_cache=False``). Unpacked rows are padded to the longest
with labels -100.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, Literal

from backpropagate.data.tokenize import IGNORE


def pack(examples: Sequence[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing into sequences of at most ``max_seq_len`` tokens.

    Longest first, each example goes into the open sequence with the least room that still fits
    it; this wastes less space than filling sequences in order. Deterministic for a given input.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    bins: list[list[int]] = []
    # (room left, bin index), kept sorted so the tightest fit is one bisect away.
    room: list[tuple[int, int]] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        if n == 0:
            continue
        if n > max_seq_len:
            raise ValueError(
                f"example of {n} tokens is longer than max_seq_len={max_seq_len}; truncate first"
            )
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            left, b = room.pop(at)
            bins[b].append(i)
            bisect.insort(room, (left - n, b))
        else:
            bins.append([i])
            bisect.insort(room, (max_seq_len - n, len(bins) - 1))
    return [_concat([examples[i] for i in members]) for members in bins]


def _concat(parts: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for ex in parts:
        n = len(ex["input_ids"])
        out["input_ids"] += ex["input_ids"]
        # The first label of each example is never predicted from the previous example's tokens.
        out["labels"] += [IGNORE, *ex["labels"][1:]]
        out["position_ids"] += list(range(n))
        out["seq_lens"].append(n)
    return out


def packing_efficiency(packed: Sequence[dict[str, list[int]]], max_seq_len: int) -> float:
    """Share of the packed sequences' capacity holding real tokens (1.0 = no padding at all)."""
    if not packed:
        return 0.0
    return sum(len(p["input_ids"]) for p in packed) / (len(packed) * max_seq_len)


def collate(
    batch: Sequence[dict[str, list[int]]],
    pad_id: int,
    *,
    attention: Literal["4d", "segments", "position_ids"] = "4d",
    dtype: Any = None,
    pad_to_multiple: int = 1,
) -> dict[str, Any]:
    """Pad a batch to its longest row (rounded up to ``pad_to_multiple``) and return tensors.

    Packed rows (with ``seq_lens``) get ``position_ids`` and one of: a float additive 4D mask of
    shape (batch, 1, L, L) in ``dtype`` (``"4d"``; default float32, match the model's dtype),
    ``segment_ids`` from which :func:`block_causal_mask` builds that mask later, on the device
    (``"segments"``: a (batch, L) tensor crosses to the GPU instead of a (batch, L, L) one), or no
    mask (``"position_ids"``). Unpacked rows get a 2D ``attention_mask`` of ones and zeros.

    On a GPU the engine rounds widths up to a multiple of 64: every batch then has one of few
    shapes, and kernels compiled for one shape (Triton specialises on divisibility by 16) are
    not compiled again halfway through a run.
    """
    import torch

    width = max(len(row["input_ids"]) for row in batch)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for r, row in enumerate(batch):
        n = len(row["input_ids"])
        ids[r, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[r, :n] = torch.tensor(row["labels"], dtype=torch.long)
    out: dict[str, Any] = {"input_ids": ids, "labels": labels}

    if not all("seq_lens" in row for row in batch):
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, row in enumerate(batch):
            mask[r, : len(row["input_ids"])] = 1
        out["attention_mask"] = mask
        return out

    positions = torch.zeros((len(batch), width), dtype=torch.long)
    segment_ids = torch.zeros((len(batch), width), dtype=torch.long)
    for r, row in enumerate(batch):
        # Padding becomes one more "example" of its own, so no real token ever attends to it.
        lens = torch.tensor([*row["seq_lens"], width - len(row["input_ids"])])
        lens = lens[lens > 0]
        starts = torch.cumsum(lens, 0) - lens
        segment_ids[r] = torch.repeat_interleave(torch.arange(len(lens)), lens)
        positions[r] = torch.arange(width) - torch.repeat_interleave(starts, lens)
    out["position_ids"] = positions
    if attention == "4d":
        out["attention_mask"] = block_causal_mask(segment_ids, dtype or torch.float32)
    elif attention == "segments":
        out["segment_ids"] = segment_ids
    return out


def block_causal_mask(segment_ids: Any, dtype: Any) -> Any:
    """Additive mask (0 = may attend, dtype minimum = may not), causal within each segment.

    ``segment_ids`` is (batch, L); the mask is (batch, 1, L, L) on the same device.
    """
    import torch

    width = segment_ids.shape[-1]
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    causal = torch.ones((width, width), dtype=torch.bool, device=segment_ids.device).tril()
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(same & causal, zero, torch.finfo(dtype).min)


def segments_to_mask(batch: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """Replace ``segment_ids`` (from ``attention="segments"``) with the 4D mask the model takes."""
    if "segment_ids" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k != "segment_ids"}
    out["attention_mask"] = block_causal_mask(batch["segment_ids"], dtype)
    return out
