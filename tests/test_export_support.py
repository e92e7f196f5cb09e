"""Tiny LoRA-tuned Llama and Qwen2 runs for the export tests, built offline and cached per session.

Widths are multiples of 256 so that K-quants apply to every weight. The base gets a few
optimizer steps on a small corpus, then a LoRA adapter a few more (its B matrices move off zero,
so merging changes the model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained language model to a new task with little data.",
    "A learning rate that is too high makes the loss diverge; too low and it crawls.",
    "Hello! How are you today? I am fine, thank you, and you?",
    "def add(a, b):\n    return a + b\n",
    "Numbers like 12345 and 3.14159 appear in text, as do dates such as 2024-05-01.",
    "Tokenizers split text into pieces; byte-level BPE never meets an unknown character.",
]
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is fine-tuning?"},
    {"role": "assistant", "content": "Adapting a pretrained model to a task."},
    {"role": "user", "content": "Give an example, please."},
]


def build_tokenizer(out: Path, with_bos: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<|begin_of_text|>"] if with_bos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    if with_bos:
        bos_id = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>" if with_bos else None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))


def build_base(out: Path, arch: str) -> Path:
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, with_bos=arch == "llama")
    vocab = len(PreTrainedTokenizerFast.from_pretrained(str(out)))
    common = dict(
        vocab_size=vocab + 12,  # padded embedding rows, as real models have
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
        with torch.no_grad():  # Qwen2 has q/k/v biases; make them non-zero so they are exercised
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    _fit(model, PreTrainedTokenizerFast.from_pretrained(str(out)), steps=40, lr=3e-3)
    model.save_pretrained(str(out))
    return out


def _fit(model: object, tok: object, steps: int, lr: float) -> None:
    """A few optimizer steps on the corpus: a model with clear next-token preferences, not noise."""
    import torch

    texts = CORPUS + [tok.apply_chat_template(SAMPLE_CONVERSATION, tokenize=False)]
    batch = tok(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_run(home: Path, arch: str) -> Path:
    """RUN_DIR with config.json (model = the base folder) and a briefly trained LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    run_dir = home / "runs" / f"export-test-{arch}"
    if (run_dir / "adapter" / "adapter_config.json").is_file():
        return run_dir
    base = build_base(home / "models" / f"export-test-{arch}", arch)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    _fit(peft_model, PreTrainedTokenizerFast.from_pretrained(str(base)), steps=10, lr=3e-3)
    (run_dir / "adapter").mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(run_dir / "adapter"))
    config = {
        "model": str(base),
        "data": str(home / "datasets" / "tiny.jsonl"),
        "method": "lora",
        "lora_r": 8,
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "metrics.json").write_text(json.dumps({"train_loss": 1.23, "eval_loss": 1.5}))
    return run_dir


@pytest.fixture(scope="session")
def llama_run(home: Path) -> Path:
    return build_run(home, "llama")


@pytest.fixture(scope="session")
def qwen2_run(home: Path) -> Path:
    return build_run(home, "qwen2")


def test_tiny_run_adapter_changes_the_model(home: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = build_run(home, "llama")
    config = json.loads((run_dir / "config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    merged = PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload()
    after = merged(ids).logits
    assert (before - after).abs().max() > 1e-2
    assert os.path.isfile(run_dir / "adapter" / "adapter_model.safetensors")
