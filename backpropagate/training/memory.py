"""Memory estimate of a training run, and `batch_size="auto"`.

An estimate is weights + trainable state (adapter or full weights, gradients, optimizer) +
activations + logits + a fixed overhead. It is arithmetic on the model's config, so the UI can
call it before anything is loaded. The activation constants are counted from what a decoder layer
keeps for backward (bf16, SDPA attention, SwiGLU MLP); bench/train_throughput.py checks the
estimate against measured peaks on a GPU and bench/RESULTS.md states the error.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

GiB = 2**30
Method = Literal["lora", "qlora", "full"]

# Per token and layer, in elements: what a Llama/Qwen2 layer keeps for backward without
# checkpointing (norm inputs/outputs, q and attention output, o_proj and MLP inputs ~ 10 x hidden;
# gate, up, act(gate), gate*up ~ 4 x intermediate; k, v before/after RoPE ~ 4 x kv width).
ACT_HIDDEN, ACT_FFN, ACT_KV = 10, 4, 4
# Loss on full logits: bf16 logits, their fp32 upcast and its gradient (bytes per vocab entry).
LOGIT_BYTES = 2 + 4 + 4
OVERHEAD_BYTES = int(0.75 * GiB)  # CUDA context, cuBLAS workspaces, allocator slack
FRAGMENTATION = 1.10


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer (q, k, v, o, gate, up, down)."""
        h, kv, ff = self.hidden, self.kv_width, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, ff), (h, ff), (ff, h)]

    @property
    def n_params(self) -> int:
        per_layer = sum(i * o for i, o in self.linear_shapes) + 2 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embed + self.hidden

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (i + o) for i, o in self.linear_shapes)


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """Read a Hugging Face config.json (as a dict) of a Llama-style decoder."""
    heads = config["num_attention_heads"]
    return ModelShape(
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def shape_from_path(model_dir: Path) -> ModelShape:
    return shape_from_config(json.loads((Path(model_dir) / "config.json").read_text()))


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    trainable_gib: float  # trainable weights + gradients + optimizer state
    activations_gib: float
    logits_gib: float
    overhead_gib: float
    total_gib: float
    micro_batch: int
    gradient_checkpointing: bool

    def fits(self, available_gib: float) -> bool:
        return self.total_gib <= available_gib

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_memory(
    shape: ModelShape,
    *,
    method: Method = "lora",
    seq_len: int = 2048,
    micro_batch: int = 1,
    gradient_checkpointing: bool = False,
    lora_r: int = 16,
    dtype_bytes: int = 2,
    optimizer: str = "adamw",
    fused_loss: bool = False,
) -> MemoryEstimate:
    """Peak memory of one training step, in GiB."""
    n = shape.n_params
    if method == "qlora":
        # 4-bit linear weights (~0.55 byte with scales); embeddings and norms stay in dtype.
        embed = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
        weights = (n - embed) * 0.55 + embed * dtype_bytes
    else:
        weights = n * dtype_bytes

    optim_bytes = 2 if optimizer == "adamw_8bit" else 8
    if method == "full":
        # weights train in the compute dtype: a gradient of the same width plus the optimizer moments
        trainable = n * (dtype_bytes + optim_bytes)
    else:
        p = shape.lora_params(lora_r)
        trainable = p * (4 + 4 + optim_bytes)  # PEFT keeps adapters and their grads in fp32

    tokens = micro_batch * seq_len
    per_layer = dtype_bytes * (
        ACT_HIDDEN * shape.hidden + ACT_FFN * shape.intermediate + ACT_KV * shape.kv_width
    )
    if gradient_checkpointing:
        # each layer keeps only its input; one layer at a time is recomputed in full
        activations = tokens * (shape.layers * dtype_bytes * shape.hidden + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    logits = tokens * shape.hidden * 8 if fused_loss else tokens * shape.vocab * LOGIT_BYTES

    total = (weights + trainable + activations + logits) * FRAGMENTATION + OVERHEAD_BYTES
    return MemoryEstimate(
        weights_gib=weights / GiB,
        trainable_gib=trainable / GiB,
        activations_gib=activations / GiB,
        logits_gib=logits / GiB,
        overhead_gib=OVERHEAD_BYTES / GiB,
        total_gib=total / GiB,
        micro_batch=micro_batch,
        gradient_checkpointing=gradient_checkpointing,
    )


# Relative step cost of recomputing the forward pass under gradient checkpointing.
CHECKPOINTING_SLOWDOWN = 1.33
# Past this many tokens per micro-batch a GPU is saturated; larger batches only cost memory.
SATURATION_TOKENS = 16384


def relative_throughput(micro_batch: int, seq_len: int, gradient_checkpointing: bool) -> float:
    """A model of tokens/s up to a constant: rises with batch until saturation, x0.75 when checkpointing."""
    tokens = micro_batch * seq_len
    utilisation = tokens / (tokens + SATURATION_TOKENS / 8)
    return utilisation / (CHECKPOINTING_SLOWDOWN if gradient_checkpointing else 1.0)


def auto_batch(
    shape: ModelShape,
    available_gib: float,
    *,
    seq_len: int,
    method: Method = "lora",
    lora_r: int = 16,
    dtype_bytes: int = 2,
    optimizer: str = "adamw",
    fused_loss: bool = False,
    max_micro_batch: int = 64,
    headroom: float = 0.92,
) -> MemoryEstimate:
    """The micro-batch and checkpointing choice with the best modelled tokens/s that fits.

    Falls back to micro-batch 1 with checkpointing when nothing fits (OOM recovery has the last word).
    """
    budget = available_gib * headroom

    def estimate(micro_batch: int, checkpointing: bool) -> MemoryEstimate:
        return estimate_memory(
            shape,
            method=method,
            seq_len=seq_len,
            micro_batch=micro_batch,
            gradient_checkpointing=checkpointing,
            lora_r=lora_r,
            dtype_bytes=dtype_bytes,
            optimizer=optimizer,
            fused_loss=fused_loss,
        )

    best: tuple[float, MemoryEstimate] | None = None
    for ckpt in (False, True):
        mb = 1
        while mb <= max_micro_batch:
            est = estimate(mb, ckpt)
            if not est.fits(budget):
                break
            score = relative_throughput(mb, seq_len, ckpt)
            if best is None or score > best[0] + 1e-9:
                best = (score, est)
            mb *= 2
    return best[1] if best is not None else estimate(1, True)
