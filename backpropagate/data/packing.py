"""Pack tokenized examples into full-length sequences and collate batches into tensors.

A packed sequence concatenates whole examples; ``position_ids`` restart at 0 for each one and
``seq_lens`` records their lengths, so attention stays inside each example. :func:`collate`
turns a batch into tensors: for packed rows a block-diagonal causal 4D mask (any attention
implementation, any device) or, with ``attention="position_ids"``, no mask at all: transformers
then finds the example boundaries from the position ids itself, which it only does when the
forward pass gets no attention mask and no cache (call the model with ``use_cache=False``).
Unpacked rows are padded to the longest with labels -100.
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
    attention: Literal["4d", "position_ids"] = "4d",
    dtype: Any = None,
) -> dict[str, Any]:
    """Pad a batch to its longest row and return the model's inputs as tensors.

    Packed rows (with ``seq_lens``) get ``position_ids`` and either a float additive 4D mask of
    shape (batch, 1, L, L) in ``dtype`` (default float32; match the model's dtype) or no mask.
    Unpacked rows get a 2D ``attention_mask`` of ones and zeros.
    """
    import torch

    width = max(len(row["input_ids"]) for row in batch)
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
    # Padding becomes one more "example" of its own, so no real token ever attends to it.
    segments = [[*row["seq_lens"], width - len(row["input_ids"])] for row in batch]
    for r, lens in enumerate(segments):
        positions[r] = torch.cat([torch.arange(n) for n in lens if n])
    out["position_ids"] = positions
    if attention == "4d":
        out["attention_mask"] = block_causal_mask(segments, width, dtype or torch.float32)
    return out


def block_causal_mask(segments: list[list[int]], width: int, dtype: Any) -> Any:
    """Additive mask (0 = may attend, dtype minimum = may not) that is causal within each segment."""
    import torch

    allowed = torch.zeros((len(segments), 1, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, lens in enumerate(segments):
        start = 0
        for n in lens:
            if n:
                allowed[r, 0, start : start + n, start : start + n] = causal[:n, :n]
            start += n
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
