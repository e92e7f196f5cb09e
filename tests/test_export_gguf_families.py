"""GGUF export of the other families: Qwen3, Mistral, Gemma 2, Gemma 3 (text) and Phi-3.

Each is a tiny random-init model with its architecture's real config shape (widths multiples of
256, so K-quants apply), briefly fitted, with a locally trained tokenizer of its family's kind
(byte-level BPE for Qwen3, SentencePiece for the others). Converted to f16, it must load in
llama.cpp and give the HF float32 model's logits (mean KL per token) and greedy tokens. The Gemma
models use a sliding window shorter than the prompts, so the window layout is checked too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_export_support import CORPUS, SAMPLE_CONVERSATION, build_tokenizer

from backpropagate.errors import BackpropError, ErrorCode

pytest.importorskip("llama_cpp")

FAMILIES = ["qwen3", "mistral", "gemma2", "gemma3", "phi3"]
LONG_PROMPT = "Fine-tuning adapts a pretrained language model to a new task with little data. The quick"
TEMPLATES = {
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "phi3": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
}
MARKERS = [
    "[INST]",
    "[/INST]",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
]


def build_spm_tokenizer(out: Path, family: str) -> None:
    """A SentencePiece BPE model with byte fallback, wrapped and saved as a real folder of the family."""
    import io

    sentencepiece = pytest.importorskip("sentencepiece", reason="sentencepiece trains the test tokenizers")
    from transformers import GemmaTokenizer, LlamaTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, user_defined_symbols=MARKERS, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        add_dummy_prefix=not family.startswith("gemma"), character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    # transformers builds tokenizer.json from tokenizer.model when it loads the folder.
    # Gemma's own converter writes no space prefix, as real Gemma tokenizers have none.
    cls = GemmaTokenizer if family.startswith("gemma") else LlamaTokenizer
    tok = cls.from_pretrained(str(out), pad_token="<pad>", add_bos_token=family != "phi3")
    tok.chat_template = TEMPLATES["gemma" if family.startswith("gemma") else family]
    tok.save_pretrained(str(out))


def _config(family: str, vocab: int, tok) -> object:
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen3Config

    common = dict(
        vocab_size=vocab + 8, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=128, tie_word_embeddings=True)  # head_dim != hidden / heads
    if family == "mistral":
        return MistralConfig(**common, head_dim=64, tie_word_embeddings=False)
    if family == "gemma2":
        return Gemma2Config(**common, head_dim=64, query_pre_attn_scalar=64, sliding_window=8)
    if family == "gemma3":
        # Six layers: five sliding-window layers (rope base 10k), then a global one (rope base 1M).
        return Gemma3TextConfig(
            **{**common, "num_hidden_layers": 6}, head_dim=64, query_pre_attn_scalar=64, sliding_window=8
        )
    return Phi3Config(**common, tie_word_embeddings=False)


def build_family(out: Path, family: str) -> Path:
    import torch
    from test_export_support import _fit
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").is_file():
        return out
    if family == "qwen3":
        build_tokenizer(out, with_bos=False)
    else:
        build_spm_tokenizer(out, family)
    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok), tok), attn_implementation="eager")
    _fit(model, tok, steps=25, lr=3e-3)
    model.save_pretrained(str(out))
    return out


def _model_dir(home: Path, family: str) -> Path:
    return build_family(home / "models" / f"gguf-family-{family}", family)


def _hf(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval(), PreTrainedTokenizerFast.from_pretrained(str(model_dir))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_f16_gguf_gives_the_hf_models_logits(family: str, home: Path, tmp_path: Path) -> None:
    import numpy as np
    import torch

    from backpropagate.export.gguf_convert import convert_to_gguf
    from backpropagate.export.verify import (
        compare_logits,
        gguf_logits,
        greedy_tokens_gguf,
        greedy_tokens_hf,
        open_gguf,
        verify_gguf,
    )

    model_dir = _model_dir(home, family)
    out = tmp_path / f"{family}-f16.gguf"
    report = convert_to_gguf(model_dir, out, "f16")
    assert not report.fallbacks, report.fallbacks
    model, tok = _hf(model_dir)
    verified = verify_gguf(out, model, tok, "f16")
    assert verified.mean_kl <= 1e-5, verified
    ids = tok(LONG_PROMPT)["input_ids"]
    assert len(ids) > 16  # past the Gemma models' sliding window of 8
    llm = open_gguf(out)
    try:
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        kl, agree = compare_logits(ref, gguf_logits(llm, ids)[:, : ref.shape[-1]])
        assert float(np.mean(kl)) <= 1e-5 and agree.all()
        assert greedy_tokens_gguf(llm, ids[:6], 12) == greedy_tokens_hf(model, ids[:6], 12)
        # llama.cpp tokenizes plain text as transformers does (with BOS where the tokenizer adds it).
        text = "Hello! How are you today?"
        assert (
            llm.tokenize(text.encode(), add_bos=bool(tok("x")["input_ids"][0] == tok.bos_token_id))
            == tok(text)["input_ids"]
        )
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_q8_0_and_q4_k_m_of_a_family_stay_close(family: str, home: Path, tmp_path: Path) -> None:
    from backpropagate.export.gguf_convert import convert_to_gguf
    from backpropagate.export.quantize import quantize_gguf
    from backpropagate.export.verify import verify_gguf

    model_dir = _model_dir(home, family)
    model, tok = _hf(model_dir)
    q8 = tmp_path / "q8_0.gguf"
    convert_to_gguf(model_dir, q8, "q8_0")
    assert verify_gguf(q8, model, tok, "q8_0").mean_kl <= 2e-3
    f16 = tmp_path / "f16.gguf"
    convert_to_gguf(model_dir, f16, "f16")
    q4 = tmp_path / "q4_k_m.gguf"
    quantize_gguf(f16, q4, "q4_k_m")
    assert verify_gguf(q4, model, tok, "q4_k_m").passed


def test_a_family_llama_cpp_would_run_differently_is_refused_before_conversion(tmp_path: Path) -> None:
    from backpropagate.export.gguf_convert import check_convertible, convert_to_gguf

    config = {
        "architectures": ["Gemma2ForCausalLM"], "hidden_size": 256, "num_attention_heads": 4, "head_dim": 64,
        "num_hidden_layers": 2, "query_pre_attn_scalar": 256, "sliding_window": 8,
        "layer_types": ["full_attention", "sliding_attention"],
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BackpropError) as err:
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", "f16")
    assert err.value.code == ErrorCode.RUNTIME_EXPORT_ARCH_UNSUPPORTED
    assert "query_pre_attn_scalar" in err.value.message and "layer_types" in err.value.message
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(BackpropError) as err:
        check_convertible({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"})
    assert "Gemma3ForCausalLM" in err.value.message
    with pytest.raises(BackpropError) as err:
        check_convertible(
            {**config, "architectures": ["Phi3ForCausalLM"], "rope_scaling": {"type": "longrope"}}
        )
    assert "longrope" in err.value.message


@pytest.mark.slow
def test_the_chat_template_renders_the_same_tokens_in_llama_cpp(home: Path, tmp_path: Path) -> None:
    from backpropagate.export.gguf_convert import convert_to_gguf
    from backpropagate.export.verify import open_gguf

    model_dir = _model_dir(home, "gemma3")
    out = tmp_path / "gemma3.gguf"
    convert_to_gguf(model_dir, out, "f16")
    _, tok = _hf(model_dir)
    conversation = [m for m in SAMPLE_CONVERSATION if m["role"] != "system"]
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    llm = open_gguf(out)
    try:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == tok(text, add_special_tokens=False)["input_ids"]
        )
    finally:
        llm.close()


@pytest.mark.slow
def test_backprop_export_model_converts_and_verifies_a_folder_trained_elsewhere(
    home: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    model_dir = _model_dir(home, "mistral")  # SentencePiece: verification reads tokenizer.json
    out = subprocess.run(
        [sys.executable, "-m", "backpropagate", "export", "--model", str(model_dir), "-q", "q8_0",
         "-o", str(tmp_path / "out"), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert Path(result["path"]).is_file() and result["verification"]["passed"]
    assert result["verification"]["mean_kl"] <= 2e-3


def test_backprop_export_wants_one_source() -> None:
    from typer.testing import CliRunner

    from backpropagate.cli import app

    assert CliRunner().invoke(app, ["export"]).exit_code == 2
    assert CliRunner().invoke(app, ["export", "RUN", "--model", "/nonexistent"]).exit_code == 2
    assert CliRunner().invoke(app, ["export", "--model", "/nonexistent"]).exit_code == 2


def test_the_space_prefix_follows_tokenizer_json_and_phi3_names_stay_loadable() -> None:
    from backpropagate.export.gguf_convert import _safe_name
    from backpropagate.export.gguf_vocab import hf_adds_space_prefix

    metaspace = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}}
    legacy = {"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}]}}
    gemma = {"normalizer": {"type": "Replace"}, "pre_tokenizer": {"type": "Split"}}
    never = {"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "never"}}
    assert [hf_adds_space_prefix(t) for t in (metaspace, legacy, gemma, never, {})] == [
        True,
        True,
        False,
        False,
        None,
    ]
    warnings: list[str] = []
    assert _safe_name("my-phi-3-tune", {"<s>"}, warnings) == "my-phi-tune" and warnings
    assert _safe_name("phi3", {"<unk>", "<s>", "</s>", "<|endoftext|>"}, []) == "phi3"
