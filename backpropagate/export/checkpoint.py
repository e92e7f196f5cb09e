"""The weights of a stopped run: its newest complete checkpoint, written out as an adapter folder.

A run that is stopped (or whose worker died) has checkpoints but no ``adapter/``: a checkpoint
holds the trainable parameters as training named them (``trainable.safetensors``), not a PEFT
folder. ``checkpoint_weights`` loads the base model the way training did, puts the checkpoint's
parameters in and saves the folder an export reads (``RUN_DIR/from-checkpoint/step-NNNNNN/``,
written under ``.partial`` and renamed, reused once written). Finding the checkpoint needs no
torch, so the server can answer "can this run be exported" without loading anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.training.checkpoints import META, WEIGHTS, verify_checkpoint

FOLDER = "from-checkpoint"


def is_checkpoint(path: Path) -> bool:
    """A finished checkpoint folder (``checkpoints/step-NNNNNN`` with its weights and meta)."""
    return path.name.startswith("step-") and (path / META).is_file() and (path / WEIGHTS).is_file()


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run whose files match their hashes (None when there is none)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    folders = sorted(
        (p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial")), reverse=True
    )
    for folder in folders:
        try:
            verify_checkpoint(folder)
        except BackpropError:
            continue  # torn by a kill or a full disk: an older one is still good
        return folder
    return None


def _done(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


def checkpoint_weights(checkpoint: Path, run_config: dict[str, Any]) -> Path:
    """An adapter (or, for full fine-tuning, model) folder holding ``checkpoint``'s weights."""
    checkpoint = checkpoint.resolve()
    run_dir = checkpoint.parent.parent
    out = run_dir / FOLDER / checkpoint.name
    if _done(out):
        return out
    verify_checkpoint(checkpoint)  # STATE_CHECKPOINT_INVALID names the broken file

    from safetensors.torch import load_file

    from backpropagate.config import RunConfig
    from backpropagate.training.backends import load_model
    from backpropagate.training.checkpoints import apply_weights

    # Built on the CPU like an export; QLoRA's adapter has the same names and shapes as LoRA's.
    # On the CPU and in bf16 or fp32: an FP8 run's checkpoint holds the same bf16 LoRA weights.
    fields = {**run_config, "device": "cpu", "backend": "transformers", "fp8": False}
    if fields.get("method") == "qlora":
        fields["method"] = "lora"
    config = RunConfig.model_validate({k: v for k, v in fields.items() if k in RunConfig.model_fields})
    loaded = load_model(config, lambda _event: None, gradient_checkpointing=False)
    apply_weights(loaded.model, load_file(checkpoint / WEIGHTS))

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    loaded.model.save_pretrained(partial)
    loaded.tokenizer.save_pretrained(partial)
    step = json.loads((checkpoint / META).read_text()).get("step")
    (partial / "checkpoint.json").write_text(json.dumps({"checkpoint": str(checkpoint), "step": step}) + "\n")
    for path in partial.iterdir():
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    if out.exists():
        shutil.rmtree(out)
    os.rename(partial, out)
    return out


def not_exportable(run_dir: Path) -> BackpropError:
    return BackpropError(
        ErrorCode.STATE_RUN_NOT_EXPORTABLE,
        f"run {run_dir.name} has no trained weights yet: no adapter and no complete checkpoint in {run_dir}",
        hint="Let it train until its first checkpoint (save_every steps), or resume it.",
    )
