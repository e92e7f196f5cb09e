"""Optimizer, learning-rate schedule, step count and micro-batch choice for a run."""

from __future__ import annotations

import math
from typing import Any

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.logs import RunLogger, get_logger

_log = get_logger(__name__)


def total_steps(config: RunConfig, n_train: int, effective_batch: int) -> int:
    """``steps`` when set, else enough optimizer steps to see the data ``epochs`` times (at least 1)."""
    if config.steps:
        return config.steps
    return max(1, math.ceil(config.epochs * n_train / effective_batch))


def build_optimizer(config: RunConfig, model: Any) -> Any:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise BackpropError(ErrorCode.RUNTIME_TRAINING_FAILED, "The model has no trainable parameters.")
    # No weight decay on biases and norms: decaying them only hurts.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise BackpropError(
                ErrorCode.DEP_EXTRA_MISSING,
                f"optimizer='adamw_8bit' needs bitsandbytes ({exc}).",
                hint="pip install 'backpropagate[gpu]', or use optimizer='adamw'.",
            ) from exc
        return bnb.optim.AdamW8bit(groups, lr=config.lr)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)


def build_scheduler(config: RunConfig, optimizer: Any, steps: int) -> Any:
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * steps),
        num_training_steps=steps,
    )


def choose_micro_batch(
    config: RunConfig, model_path: str, device: Any, log: RunLogger = _log
) -> tuple[int, bool | None]:
    """(micro-batch, gradient checkpointing or None for "decide later") for this run.

    ``batch_size="auto"`` asks the memory model for the fastest micro-batch that fits the GPU's free
    memory; on CPU it is 1 (no memory wall to find, and small batches keep steps short).
    """
    if config.batch_size != "auto":
        return int(config.batch_size), None
    if device.type != "cuda":
        return 1, None
    import torch
    from transformers import AutoConfig

    from backpropagate.training.memory import auto_batch, shape_from_config

    free, _total = torch.cuda.mem_get_info(device)
    shape = shape_from_config(AutoConfig.from_pretrained(model_path).to_dict())
    estimate = auto_batch(
        shape,
        free / 2**30,
        seq_len=config.max_seq_len,
        method=config.method,
        lora_r=config.lora_r,
        dtype_bytes=4 if config.precision == "fp32" else 2,
        optimizer=config.optimizer,
    )
    log.info(
        "batch_size=auto chose micro-batch %d (estimate %.1f GiB)", estimate.micro_batch, estimate.total_gib
    )
    checkpointing = estimate.gradient_checkpointing if config.gradient_checkpointing == "auto" else None
    return estimate.micro_batch, checkpointing
