"""Merging the LoRA adapters of successive runs: SLAO, and a plain linear average.

SLAO (single LoRA, asymmetric merge, orthogonal init) keeps one adapter across runs. After run
``i`` (1-based) with weight

    λ(i) = clamp(1 / sqrt(i), 0.1, 1)

each LoRA pair (A: r x in, B: out x r) is merged as

    A ← A_new                      (the new run's A, as it is)
    B ← B + λ(i) · (B_new − B)     (B moves towards the new run's B by λ)

and the next run starts from that B and from A_init = Qᵀ, where A_mergedᵀ = Q R (QR, with the
signs of Q's columns flipped so that diag(R) ≥ 0, which makes Q unique). Its rows are an
orthonormal basis of the row space of the previous A: the next run keeps the directions the
adapter reads its input along, at a fixed scale, instead of starting them afresh.

Caveat: A and B are merged independently, so the merged update B·A is *not* a weighted average
of the runs' updates ΔW = B·A (the product of averages is not the average of products), and
starting the next run from Qᵀ instead of A changes B·A before its first step. The merge is a
heuristic that limits forgetting in practice; it is not an interpolation of models.

``linear`` is the plain alternative: A and B are both the running mean of every run's adapter,
``X ← X + (X_new − X) / i``, and the next run starts from the merged adapter unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Literal

Merge = Literal["slao", "linear"]
LAMBDA_MIN, LAMBDA_MAX = 0.1, 1.0


def slao_lambda(i: int) -> float:
    """Weight of run ``i`` (1-based) in the merge of B."""
    if i < 1:
        raise ValueError(f"run index is 1-based, got {i}")
    return min(LAMBDA_MAX, max(LAMBDA_MIN, 1.0 / math.sqrt(i)))


def merge_weight(merge: Merge, i: int) -> float:
    return slao_lambda(i) if merge == "slao" else 1.0 / i


def lora_pairs(state: dict[str, Any]) -> list[tuple[str, str]]:
    """(A key, B key) of every LoRA module in a saved adapter's state dict."""
    pairs = []
    for key in sorted(state):
        if ".lora_A." in key:
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in state:
                raise ValueError(f"adapter has {key} but no {b_key}")
            pairs.append((key, b_key))
    return pairs


def merge_adapters(
    merged: dict[str, Any] | None, new: dict[str, Any], i: int, merge: Merge = "slao"
) -> dict[str, Any]:
    """The adapter after run ``i``: ``merged`` (None before the first run) combined with ``new``."""
    if merged is None or i == 1:
        return {k: v.clone() for k, v in new.items()}
    if set(merged) != set(new):
        raise ValueError("the runs' adapters have different modules; multi-run needs one LoRA shape")
    lam = merge_weight(merge, i)
    out = {}
    for key, value in new.items():
        old = merged[key]
        if merge == "slao" and ".lora_A." in key:
            out[key] = value.clone()
        else:  # B under SLAO; every tensor under linear
            out[key] = old + lam * (value.to(old.dtype) - old)
    return out


def orthogonal_rows(a: Any) -> Any:
    """An orthonormal basis of the row space of ``a`` (r x in, r <= in), sign-corrected QR."""
    import torch

    q, r = torch.linalg.qr(a.T.to(torch.float64), mode="reduced")  # q: in x r
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.to(a.dtype).contiguous()


def next_run_init(merged: dict[str, Any], merge: Merge = "slao") -> dict[str, Any]:
    """The adapter the next run starts from: SLAO's orthogonal A with the merged B, or the merge itself."""
    if merge != "slao":
        return {k: v.clone() for k, v in merged.items()}
    out = {k: v.clone() for k, v in merged.items()}
    for a_key, _ in lora_pairs(merged):
        out[a_key] = orthogonal_rows(merged[a_key])
    return out
