"""Convert a Hugging Face model folder (safetensors) to a GGUF file with the `gguf` package.

Families: Llama (incl. Llama 3 rope scaling) and Mistral (llama.cpp's ``llama``), Qwen2, Qwen3
(q/k norms), Gemma 2 and Gemma 3 text (norm weights stored as offsets from 1, logit soft-capping,
sliding-window layers), Phi-3/Phi-4-mini (fused qkv and gate-up); byte-level BPE and SentencePiece
tokenizers (``gguf_vocab``). llama.cpp's own converter (``convert_hf_to_gguf.py``) is not installed by
any package, so this module is the path for every family; each is checked against the HF model by
the KL verification. What llama.cpp cannot run as transformers does is refused by
:func:`check_convertible` before anything is merged or written.
Tensors are streamed one at a time (``safe_open``), so converting never holds two copies of
the model in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export.gguf_vocab import add_spm_tokenizer, tokenizer_kind
from backpropagate.logs import get_logger

log = get_logger(__name__)

# HF architecture class -> GGUF architecture name. Mistral-style models are Llama to llama.cpp.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
# Architectures named so the refusal can say what to do instead.
NOT_TEXT_ONLY = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM (the text model)"}
# llama.cpp's fixed sliding-window layouts: layer i is sliding when i % period < sliding.
SWA_PATTERNS = {"gemma2": (2, 1), "gemma3": (6, 5)}
GEMMA = ("gemma2", "gemma3")
# Types written directly by this converter; K-quants go through llama.cpp (see quantize.py).
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class ConvertReport:
    """What the converter wrote and what it had to change on the way."""

    path: Path
    arch: str
    tensor_count: int
    bytes_written: int
    fallbacks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def strip_generation_markers(template: str) -> str:
    """Remove `{% generation %}` / `{% endgeneration %}` (a transformers-only tag llama.cpp lacks)."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise BackpropError(
            ErrorCode.RUNTIME_GGUF_EXPORT_FAILED,
            f"{path} is missing: expected a Hugging Face model folder with config.json and *.safetensors",
        )
    return json.loads(path.read_text())


def gguf_arch(config: dict[str, Any]) -> str:
    """The GGUF architecture for a HF config, or RUNTIME_EXPORT_ARCH_UNSUPPORTED naming it."""
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    for name in archs:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    instead = NOT_TEXT_ONLY.get(archs[0])
    raise BackpropError(
        ErrorCode.RUNTIME_EXPORT_ARCH_UNSUPPORTED,
        f"Cannot export architecture {archs[0]!r} (model_type {config.get('model_type')!r}) to GGUF; "
        + (f"export {instead} instead; " if instead else "")
        + f"supported: {', '.join(sorted(ARCHITECTURES))}",
        architecture=archs[0],
    )


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


def check_convertible(config: dict[str, Any]) -> str:
    """The GGUF architecture, after refusing what llama.cpp would run differently from transformers.

    Every problem is reported at once (RUNTIME_EXPORT_ARCH_UNSUPPORTED), before any merge or write.
    """
    arch = gguf_arch(config)
    problems: list[str] = []
    _theta, rope = _rope_theta(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    allowed = {"llama": ("default", "linear", "llama3"), "gemma3": ("default", "linear")}.get(
        arch, ("default", "linear")
    )
    if rope_type not in (*allowed, None):
        problems.append(f"rope scaling {rope_type!r} (supported for {arch}: {', '.join(allowed)})")
    if arch in GEMMA:
        head_dim = _head_dim(config)
        scalar = config.get("query_pre_attn_scalar")
        hidden, n_head, n_layers = (
            int(config[k]) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")
        )
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B shape (hidden / heads).
        if (
            scalar is not None
            and int(scalar) != head_dim
            and not (int(scalar) == hidden // n_head and n_layers in (46, 62))
        ):
            problems.append(
                f"query_pre_attn_scalar {scalar} differs from head_dim {head_dim} (llama.cpp scales by head_dim)"
            )
        period, sliding = SWA_PATTERNS[arch]
        layer_types = config.get("layer_types")
        if layer_types and config.get("sliding_window"):
            expected = [
                "sliding_attention" if i % period < sliding else "full_attention" for i in range(n_layers)
            ]
            if list(layer_types) != expected:
                problems.append(
                    f"layer_types {layer_types} is not llama.cpp's fixed {arch} layout "
                    f"({sliding} sliding-window layer(s) in every {period})"
                )
    if arch == "gemma3" and config.get("attn_logit_softcapping"):
        problems.append("Gemma 3 with attn_logit_softcapping (llama.cpp's gemma3 has none)")
    if arch == "phi3" and rope_type not in ("default", None):
        problems.append(f"Phi-3 rope scaling {rope_type!r} (only unscaled rope is converted)")
    if problems:
        raise BackpropError(
            ErrorCode.RUNTIME_EXPORT_ARCH_UNSUPPORTED,
            f"Cannot export this {config.get('architectures', [arch])[0]} to GGUF: " + "; ".join(problems),
            architecture=arch,
        )
    return arch


def _rope_theta(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    # transformers 5 keeps rope settings under rope_parameters; older configs at the top level.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3): the global layers'
        params = dict(params["full_attention"])
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), params


def _rope_theta_swa(config: dict[str, Any]) -> float | None:
    """The sliding-window layers' rope base, where it differs from the global one (Gemma 3)."""
    params = config.get("rope_parameters") or {}
    if isinstance(params.get("sliding_attention"), dict):
        return float(params["sliding_attention"].get("rope_theta", 10000.0))
    base = config.get("rope_local_base_freq")
    return float(base) if base is not None else None


def _llama3_rope_factors(rope: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1-style rope scaling (llama.cpp's ``rope_freqs``).

    High frequencies (short wavelengths) stay, low ones are divided by ``factor``, and the band
    between is interpolated smoothly; transformers applies the same rule to ``inv_freq``.
    """
    factor = float(rope["factor"])
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = np.where(wavelen < old_ctx / high, 1.0, divisor)
    divisor = np.where(wavelen > old_ctx / low, factor, divisor)
    return divisor.astype(np.float32)


# ---------------------------------------------------------------- tokenizer


# Pre-tokenizer regexes llama.cpp knows, by the name it knows them under.
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def _pre_tokenizer_name(tok_json: dict[str, Any], warnings: list[str]) -> str:
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "Split":
            regex = (part.get("pattern") or {}).get("Regex")
            if regex in _PRE_TOKENIZERS:
                return _PRE_TOKENIZERS[regex]
            warnings.append("unrecognised pre-tokenizer regex; wrote 'gpt-2' (check tokenization)")
            return "gpt-2"
    # A bare ByteLevel pre-tokenizer (with its built-in regex) is GPT-2's.
    return "gpt-2"


def _token_id(tok_json: dict[str, Any], tok_cfg: dict[str, Any], key: str) -> int | None:
    value = tok_cfg.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if not value:
        return None
    for added in tok_json.get("added_tokens", []):
        if added["content"] == value:
            return int(added["id"])
    return tok_json["model"]["vocab"].get(value)


def _add_tokenizer(writer: Any, model_dir: Path, n_vocab: int, warnings: list[str]) -> dict[str, Any]:
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise BackpropError(
            ErrorCode.RUNTIME_EXPORT_ARCH_UNSUPPORTED,
            f"{model_dir} has no tokenizer.json; only byte-level BPE tokenizers (tokenizer.json) "
            "can be written to GGUF by this converter",
        )
    tok_json = json.loads(path.read_text())
    model = tok_json["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise BackpropError(
            ErrorCode.RUNTIME_EXPORT_ARCH_UNSUPPORTED,
            f"tokenizer type {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) in {path} "
            "is not byte-level BPE; this converter writes byte-level BPE only",
        )
    cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tok_json.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    size = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        # The embedding matrix is often padded past the tokenizer; llama.cpp needs a name per row.
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json, warnings))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {}
    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("pad_token", writer.add_pad_token_id),
        ("unk_token", writer.add_unk_token_id),
    ):
        tid = _token_id(tok_json, tok_cfg, key)
        if tid is not None:
            add(tid)
            ids[key] = tid
    # Does the tokenizer put BOS in front of every text? Its post-processor says so.
    post = json.dumps(tok_json.get("post_processor") or {})
    bos = tok_cfg.get("bos_token")
    bos_text = bos.get("content") if isinstance(bos, dict) else bos
    add_bos = bool(tok_cfg.get("add_bos_token", bos_text is not None and f'"{bos_text}"' in post))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    return {"tokens": len(tokens), "add_bos": add_bos, "texts": set(tokens), **ids}


def read_chat_template(model_dir: Path, tok_cfg: dict[str, Any] | None = None) -> str | None:
    """The chat template: transformers 5 writes chat_template.jinja, older ones tokenizer_config."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    if tok_cfg is None:
        cfg_path = model_dir / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    template = tok_cfg.get("chat_template")
    return template if isinstance(template, str) else None


def _add_family_keys(writer: Any, arch: str, config: dict[str, Any], warnings: list[str]) -> None:
    """Metadata one family needs beyond the common keys."""
    window = config.get("sliding_window")
    if arch in GEMMA:
        if window:
            writer.add_sliding_window(int(window))
        if config.get("attn_logit_softcapping"):
            writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if arch == "gemma3":
        swa_theta = _rope_theta_swa(config)
        if swa_theta is not None:
            writer.add_rope_freq_base_swa(swa_theta)
    if arch == "phi3" and window:
        writer.add_sliding_window(int(window))
    if arch == "llama" and window and int(window) < int(config.get("max_position_embeddings", 0)):
        # llama.cpp's llama has no sliding window (as its own converter): same output up to it.
        warnings.append(
            f"sliding_window {window} is not kept: llama.cpp attends to the whole context "
            f"(outputs match up to {window} tokens)"
        )


# llama.cpp sets token attributes by the model's *name*: one with "phi3"/"phi-3" in it must have
# these tokens, or loading fails (`unordered_map::at`). A tokenizer without them keeps a safe name.
_PHI3_NAME_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def _safe_name(name: str, texts: set[str], warnings: list[str]) -> str:
    if re.search(r"phi-?3", name, re.I) and not all(t in texts for t in _PHI3_NAME_TOKENS):
        safe = re.sub(r"(phi)-?3", r"\1", name, flags=re.I)
        warnings.append(
            f"GGUF name {safe!r} instead of {name!r}: llama.cpp wants Phi-3 special tokens for that name"
        )
        return safe
    return name


# ---------------------------------------------------------------- tensors


def _safetensor_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise BackpropError(
            ErrorCode.RUNTIME_GGUF_EXPORT_FAILED,
            f"No *.safetensors in {model_dir}: export merged weights (safetensors) first",
        )
    return files


def _iter_names(files: list[Path]) -> Iterator[tuple[Path, str, list[int]]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield path, name, list(f.get_slice(name).get_shape())


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF stores q/k with the two rope halves split; llama.cpp's llama arch wants them interleaved.
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _Plan:
    hf_name: str
    gguf_name: str
    file: Path
    shape: list[int]
    qtype: Any  # gguf.GGMLQuantizationType


def _choose_type(gguf_name: str, shape: list[int], out_type: str, fallbacks: list[str]) -> Any:
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    # Norms, biases and other 1-D tensors stay f32: llama.cpp expects it and they are tiny.
    if len(shape) < 2 or out_type == "f32":
        return Q.F32
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    block = GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        fallbacks.append(f"{gguf_name}: width {shape[-1]} is not a multiple of {block}; wrote f16")
        return Q.F16
    return wanted


def convert_to_gguf(
    model_dir: Path,
    out_path: Path,
    out_type: str = "f16",
    *,
    name: str | None = None,
    progress: Progress | None = None,
) -> ConvertReport:
    """Write ``out_path`` (GGUF, type f32/f16/bf16/q8_0) from the HF folder ``model_dir``."""
    import gguf
    import torch
    from safetensors import safe_open

    if out_type not in DIRECT_TYPES:
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"convert_to_gguf writes {', '.join(DIRECT_TYPES)}; got {out_type!r} (K-quants: see quantize)",
        )
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = read_model_config(model_dir)
    arch = check_convertible(config)
    vocab_kind = tokenizer_kind(model_dir)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = _head_dim(config)
    # Gemma ties its output layer to the embeddings whether or not the config says so.
    tied = bool(config.get("tie_word_embeddings", arch in GEMMA))
    theta, rope = _rope_theta(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_dims = int(head_dim * float(config.get("partial_rotary_factor") or 1.0))

    report = ConvertReport(path=out_path, arch=arch, tensor_count=0, bytes_written=0)
    name_map = gguf.get_tensor_name_map(arch_enum, n_layers)
    plans: list[_Plan] = []
    for file, hf_name, shape in _iter_names(_safetensor_files(model_dir)):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp falls back to token_embd for a tied output layer
        gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise BackpropError(
                ErrorCode.RUNTIME_EXPORT_ARCH_UNSUPPORTED,
                f"tensor {hf_name!r} in {file.name} has no GGUF counterpart for architecture {arch}",
            )
        plans.append(
            _Plan(hf_name, gname, file, shape, _choose_type(gname, shape, out_type, report.fallbacks))
        )

    rope_factors = _llama3_rope_factors(rope, theta, head_dim) if rope_type == "llama3" else None

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[out_type]
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(rope_dims)
    if head_dim != hidden // n_head or arch in GEMMA:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if rope_factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor_info(name, list(rope_factors.shape), np.dtype(np.float32), rope_factors.nbytes)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    _add_family_keys(writer, arch, config, report.warnings)
    n_vocab = int(config["vocab_size"])
    writer.add_vocab_size(n_vocab)
    if vocab_kind == "spm":
        vocab = add_spm_tokenizer(writer, model_dir, n_vocab)
    else:
        vocab = _add_tokenizer(writer, model_dir, n_vocab, report.warnings)
    writer.add_name(_safe_name(name or model_dir.name, vocab["texts"], report.warnings))
    template = read_chat_template(model_dir)
    if template:
        writer.add_chat_template(strip_generation_markers(template))

    for plan in plans:
        if plan.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.float32 if plan.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            nbytes = int(np.prod(plan.shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(dtype), nbytes)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(plan.shape, plan.qtype)
            writer.add_tensor_info(
                plan.gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=plan.qtype
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()

    # Second pass: one tensor in memory at a time, in the order the infos were written.
    open_files: dict[Path, Any] = {}
    try:
        if rope_factors is not None:
            writer.write_tensor_data(rope_factors)
            report.tensor_count += 1
        for i, plan in enumerate(plans):
            if plan.file not in open_files:
                open_files[plan.file] = safe_open(str(plan.file), framework="pt")
            tensor = open_files[plan.file].get_tensor(plan.hf_name)
            data = tensor.to(torch.float32).numpy()
            del tensor
            if arch == "llama" and plan.hf_name.endswith("q_proj.weight"):
                data = _permute_rope(data, n_head)
            elif arch == "llama" and plan.hf_name.endswith("k_proj.weight"):
                data = _permute_rope(data, n_kv)
            elif arch in GEMMA and plan.hf_name.endswith("norm.weight"):
                data = data + 1.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
            if plan.qtype == gguf.GGMLQuantizationType.F32:
                out = data
            elif plan.qtype == gguf.GGMLQuantizationType.F16:
                out = data.astype(np.float16)
            else:
                out = gguf.quants.quantize(data, plan.qtype)
            writer.write_tensor_data(out)
            report.tensor_count += 1
            report.bytes_written += out.nbytes
            del data, out
            if progress:
                progress(i + 1, len(plans), plan.gguf_name)
    finally:
        open_files.clear()
        writer.close()
    for note in report.fallbacks:
        log.warning("quantization fallback: %s", note)
    return report
