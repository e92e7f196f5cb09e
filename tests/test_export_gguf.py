"""GGUF export of tiny LoRA-tuned Llama and Qwen2 runs, checked against the HF model in llama.cpp."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_export_support import SAMPLE_CONVERSATION, llama_run, qwen2_run  # noqa: F401 - fixtures

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export import export_run
from backpropagate.export.source import resolve_source

pytest.importorskip("llama_cpp")

EXPORTS: dict[tuple[str, str], object] = {}


def _export(run_dir: Path, q: str):
    key = (str(run_dir), q)
    if key not in EXPORTS:
        EXPORTS[key] = export_run(str(run_dir), "gguf", q)
    return EXPORTS[key]


def _merged_hf(run_dir: Path):
    from backpropagate.export.merge import load_merged_model

    return load_merged_model(resolve_source(run_dir), "f32")


def _tokenizer(run_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(json.loads((run_dir / "config.json").read_text())["model"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_f16_greedy_output_equals_hf(arch: str, llama_run: Path, qwen2_run: Path) -> None:  # noqa: F811
    from backpropagate.export.verify import greedy_tokens_gguf, greedy_tokens_hf, open_gguf

    run_dir = llama_run if arch == "llama" else qwen2_run
    result = _export(run_dir, "f16")
    assert Path(result.path).is_file() and result.path.endswith("-f16.gguf")
    assert result.verification and result.verification["passed"]
    model, tok = _merged_hf(run_dir), _tokenizer(run_dir)
    llm = open_gguf(Path(result.path))
    try:
        for prompt in ("The quick brown fox", "Hello! How are"):
            ids = tok(prompt)["input_ids"]
            assert greedy_tokens_gguf(llm, ids, 20) == greedy_tokens_hf(model, ids, 20)
    finally:
        llm.close()


@pytest.mark.parametrize(("q", "limit"), [("f16", 1e-3), ("q8_0", 2e-2), ("q4_k_m", 0.2)])
def test_kl_thresholds_hold(q: str, limit: float, qwen2_run: Path) -> None:  # noqa: F811
    result = _export(qwen2_run, q)
    report = json.loads(Path(result.path).with_suffix(".verify.json").read_text())
    assert report["quantization"] == q
    assert 0 <= report["mean_kl"] < limit
    # More bits, closer to the original model: f16 agrees on (almost) every next token.
    assert report["top1_agreement"] >= {"f16": 0.97, "q8_0": 0.9, "q4_k_m": 0.7}[q]
    assert len(report["prompts"]) == 5  # four fixed prompts and one templated conversation


def test_q4_k_m_is_smaller_and_really_k_quantized(qwen2_run: Path) -> None:  # noqa: F811
    import gguf

    f16, q4 = Path(_export(qwen2_run, "f16").path), Path(_export(qwen2_run, "q4_k_m").path)
    assert q4.stat().st_size < f16.stat().st_size * 0.6
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q4)).tensors}
    assert types["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd


def test_chat_template_round_trips(llama_run: Path) -> None:  # noqa: F811
    import gguf

    from backpropagate.export.verify import open_gguf

    result = _export(llama_run, "f16")
    reader = gguf.GGUFReader(result.path)
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    # The llama tokenizer's post-processor adds BOS; the GGUF must tell llama.cpp to do the same.
    assert bool(reader.fields["tokenizer.ggml.add_bos_token"].parts[-1][0]) is True
    assert (
        "<|im_start|>" in template and "{% generation %}" not in template and "endgeneration" not in template
    )
    tok = _tokenizer(llama_run)
    text = tok.apply_chat_template(SAMPLE_CONVERSATION, add_generation_prompt=True, tokenize=False)
    hf_ids = tok(text)["input_ids"]  # with BOS, as the llama tokenizer adds it
    llm = open_gguf(Path(result.path))
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf_ids
        assert hf_ids[0] == tok.bos_token_id
    finally:
        llm.close()


def test_verification_fails_when_the_gguf_is_another_model(llama_run: Path, qwen2_run: Path) -> None:  # noqa: F811
    from backpropagate.export.verify import verify_gguf

    wrong = Path(_export(qwen2_run, "f16").path)
    with pytest.raises(BackpropError) as err:
        verify_gguf(wrong, _merged_hf(llama_run), _tokenizer(llama_run), "f16")
    assert err.value.code == ErrorCode.RUNTIME_GGUF_EXPORT_FAILED
    assert "mean KL" in err.value.message


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from backpropagate.export.gguf_convert import convert_to_gguf

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    with pytest.raises(BackpropError) as err:
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", "f16")
    assert err.value.code == ErrorCode.RUNTIME_EXPORT_ARCH_UNSUPPORTED
    assert "GPT2LMHeadModel" in err.value.message


def test_without_llama_cpp_k_quants_fail_and_f16_skips_verification(
    qwen2_run: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(BackpropError) as err:
        export_run(str(qwen2_run), "gguf", "q4_k_m", output=tmp_path / "q4")
    assert err.value.code == ErrorCode.DEP_LLAMA_CPP_MISSING
    assert not list((tmp_path / "q4").glob("*.gguf"))  # refused before converting anything
    stages: dict[str, tuple[int, int]] = {}
    result = export_run(
        str(qwen2_run),
        "gguf",
        "q8_0",
        output=tmp_path / "q8",
        progress=lambda s, d, t: stages.update({s: (d, t)}),
    )
    assert Path(result.path).is_file() and result.verification is None
    assert stages["merge"] == (1, 1) and stages["convert"][0] == stages["convert"][1] > 10
    assert "verify" not in stages
    assert any("verification skipped" in w for w in result.warnings)


def test_modelfile_and_manifest_written_next_to_the_gguf(qwen2_run: Path) -> None:  # noqa: F811
    result = _export(qwen2_run, "q8_0")
    out = Path(result.output_dir)
    assert out == qwen2_run / "exports" / "gguf-q8_0"
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{Path(result.path).name}\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert json.loads((out / "result.json").read_text())["path"] == result.path
    assert not (out / ".work").exists()
