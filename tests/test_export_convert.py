"""Converter details that need no llama.cpp: width fallbacks, rope permutation, stripped markers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_export_support import CHATML, build_tokenizer

from backpropagate.export.gguf_convert import _permute_rope, convert_to_gguf, strip_generation_markers
from backpropagate.export.quantize import width_fallbacks


def _odd_width_model(out: Path) -> Path:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    build_tokenizer(out, with_bos=False)
    vocab = len(PreTrainedTokenizerFast.from_pretrained(str(out)))
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=96,  # a multiple of 32 but not of 256
        intermediate_size=80,  # not even a multiple of 32
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(out))
    return out


def test_widths_that_do_not_fit_a_block_fall_back_and_say_so(tmp_path: Path) -> None:
    import gguf

    model = _odd_width_model(tmp_path / "odd")
    seen: list[tuple[int, int]] = []
    report = convert_to_gguf(
        model, tmp_path / "odd.gguf", "q8_0", progress=lambda d, t, _n: seen.append((d, t))
    )
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "odd.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16"  # input width 80: no Q8_0 block fits
    assert types["blk.0.ffn_up.weight"] == "Q8_0"  # input width 96 = 3 blocks of 32
    assert any("blk.0.ffn_down.weight" in f and "80" in f for f in report.fallbacks)
    assert seen[-1] == (report.tensor_count, report.tensor_count)
    notes = width_fallbacks(model, "q4_k_m")
    assert any("hidden_size=96" in n for n in notes) and any("intermediate_size=80" in n for n in notes)
    assert width_fallbacks(model, "q8_0") == []


def test_rope_permutation_interleaves_the_two_halves_per_head() -> None:
    # One head of dim 4: HF rows [r0, r1 | r2, r3] (two halves) become [r0, r2, r1, r3].
    w = np.arange(8, dtype=np.float32).reshape(8, 1)  # two heads
    assert _permute_rope(w, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_generation_markers_are_removed_and_nothing_else() -> None:
    stripped = strip_generation_markers(CHATML)
    assert "{% generation %}" not in stripped and "{% endgeneration %}" not in stripped
    assert stripped == CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert strip_generation_markers("{%- generation -%}x{%- endgeneration -%}") == "x"


def test_llama3_rope_scaling_is_exported_as_rope_freqs(tmp_path: Path, monkeypatch) -> None:
    import pytest

    pytest.importorskip("llama_cpp")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from backpropagate.errors import BackpropError
    from backpropagate.export import gguf_convert
    from backpropagate.export.verify import verify_gguf

    out = tmp_path / "llama31"
    build_tokenizer(out, with_bos=True)
    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        # A short original context puts the scaled band inside the test prompts' positions.
        "original_max_position_embeddings": 64,
    }
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters=rope,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out))
    convert_to_gguf(out, tmp_path / "ok.gguf", "f32")
    assert verify_gguf(tmp_path / "ok.gguf", model, tok, "f32").mean_kl < 1e-3

    # Without the factors the same weights disagree: the check above is sensitive to them.
    monkeypatch.setattr(gguf_convert, "_llama3_rope_factors", lambda *a: np.ones(32, dtype=np.float32))
    convert_to_gguf(out, tmp_path / "bad.gguf", "f32")
    with pytest.raises(BackpropError):
        verify_gguf(tmp_path / "bad.gguf", model, tok, "f32")
