"""Adapter and merged-weights exports: PEFT files with a model card, or the adapter folded in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export.source import ExportSource
from backpropagate.logs import get_logger

log = get_logger(__name__)

Dtype = Literal["f32", "f16", "bf16"]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def _torch_dtype(dtype: str) -> Any:
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]


def copy_tokenizer(src: ExportSource, out_dir: Path) -> None:
    """Put the tokenizer (adapter folder's if it has one, else the base's) and chat template in out_dir."""
    for folder in (src.adapter_dir, Path(src.base_model)):
        if folder is not None and (folder / "tokenizer.json").is_file():
            for name in TOKENIZER_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, out_dir / name)
            return
    from transformers import AutoTokenizer  # a hub id: let transformers fetch and save it

    try:
        AutoTokenizer.from_pretrained(src.base_model).save_pretrained(str(out_dir))
    except Exception as exc:  # noqa: BLE001 - any load failure means the same to the user
        raise BackpropError(
            ErrorCode.DEP_MODEL_LOAD_FAILED, f"cannot load the tokenizer of {src.base_model}: {exc}"
        ) from exc


def model_card(src: ExportSource, kind: str, extra: dict[str, Any] | None = None) -> str:
    """README.md for an export: base model, the run's config, data fingerprint and final metrics."""
    lines = [
        "---",
        "library_name: peft" if kind == "adapter" else "library_name: transformers",
        f"base_model: {src.base_model}",
        "tags: [backpropagate, lora]" if kind == "adapter" else "tags: [backpropagate]",
        "---",
        "",
        f"# {src.name} ({kind})",
        "",
        f"Fine-tuned from `{src.base_model}` with Backpropagate.",
        "",
    ]
    config = src.run_config or {}
    fingerprint = _data_fingerprint(config.get("data"))
    if fingerprint:
        lines += [f"Training data fingerprint: `{fingerprint}`", ""]
    metrics_path = src.run_dir / "metrics.json" if src.run_dir else None
    if metrics_path and metrics_path.is_file():
        lines += ["## Metrics", "", "```json", metrics_path.read_text().strip(), "```", ""]
    if config:
        lines += ["## Training configuration", "", "```json", json.dumps(config, indent=2), "```", ""]
    if extra:
        lines += ["## Export", "", "```json", json.dumps(extra, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _data_fingerprint(data: str | None) -> str | None:
    if not data:
        return None
    try:
        from backpropagate.data import dataset_fingerprint  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        return str(dataset_fingerprint(data))
    except Exception:  # noqa: BLE001 - the card is still useful without it (data may be gone)
        return None


def export_adapter(src: ExportSource, out_dir: Path) -> Path:
    """Copy the PEFT adapter (safetensors + adapter_config) with tokenizer and a model card."""
    if src.adapter_dir is None:
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"{src.base_model} is a full model, not an adapter: export --format merged or gguf",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = list(src.adapter_dir.glob("adapter_model*.safetensors"))
    if not weights:
        raise BackpropError(
            ErrorCode.STATE_CHECKPOINT_INVALID,
            f"{src.adapter_dir} has no adapter_model.safetensors",
        )
    for path in [*weights, src.adapter_dir / "adapter_config.json"]:
        shutil.copy2(path, out_dir / path.name)
    copy_tokenizer(src, out_dir)
    (out_dir / "README.md").write_text(model_card(src, "adapter"))
    return out_dir


def load_merged_model(src: ExportSource, dtype: Dtype = "f32") -> Any:
    """The base model with the adapter folded in (or the full model), on CPU, in ``dtype``."""
    from transformers import AutoModelForCausalLM

    # Load straight in the target dtype: one copy of the model, never an f32 copy of a bf16 7B.
    # PEFT keeps the adapter in f32 and adds its delta in that precision before casting.
    try:
        model = AutoModelForCausalLM.from_pretrained(src.base_model, dtype=_torch_dtype(dtype))
    except Exception as exc:  # noqa: BLE001
        raise BackpropError(ErrorCode.DEP_MODEL_LOAD_FAILED, f"cannot load {src.base_model}: {exc}") from exc
    if src.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(src.adapter_dir)).merge_and_unload()
    return model.eval()


def export_merged(
    src: ExportSource, out_dir: Path, dtype: Dtype = "f16", max_shard_size: str = "5GB"
) -> Path:
    """Write merged safetensors (sharded above ``max_shard_size``), tokenizer and model card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_merged_model(src, dtype)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size, safe_serialization=True)
    del model
    copy_tokenizer(src, out_dir)
    (out_dir / "README.md").write_text(model_card(src, "merged", {"dtype": dtype}))
    return out_dir
