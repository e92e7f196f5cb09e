"""Tokenizers for GGUF: byte-level BPE (``tokenizer.json``) and SentencePiece (``tokenizer.model``).

llama.cpp knows a tokenizer by its ``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE: tokens,
merges, a named pre-tokenizer) or ``llama`` (SentencePiece: pieces with scores and types, byte
fallback pieces ``<0xNN>``, and whether a space is put in front of the text). Llama 3, Qwen2/3 use
the first; Mistral, Gemma and Phi-3 the second. The SentencePiece model file is a protobuf; the
few fields needed are read directly, so exporting needs no ``sentencepiece`` package.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode


@dataclass
class SpmModel:
    pieces: list[tuple[str, float, int]]  # (text, score, SentencePiece type: 1 normal .. 6 byte)
    add_dummy_prefix: bool


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message; nested messages stay bytes."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, wire, value))
    return out


def read_spm(path: Path) -> SpmModel:
    """Pieces and the dummy-prefix flag of a SentencePiece ``ModelProto`` file."""
    pieces: list[tuple[str, float, int]] = []
    add_dummy_prefix = True  # the proto's default
    try:
        for number, _wire, value in _fields(path.read_bytes()):
            if number == 1:  # SentencePiece {1: piece, 2: score, 3: type}
                text, score, kind = "", 0.0, 1
                for n, _w, v in _fields(value):
                    if n == 1:
                        text = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = int(v)
                pieces.append((text, score, kind))
            elif number == 3:  # NormalizerSpec {3: add_dummy_prefix}
                for n, _w, v in _fields(value):
                    if n == 3:
                        add_dummy_prefix = bool(v)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise BackpropError(
            ErrorCode.RUNTIME_GGUF_EXPORT_FAILED, f"{path} is not a readable SentencePiece model: {exc}"
        ) from exc
    if not pieces:
        raise BackpropError(ErrorCode.RUNTIME_GGUF_EXPORT_FAILED, f"{path} holds no SentencePiece pieces")
    return SpmModel(pieces, add_dummy_prefix)


def tokenizer_kind(model_dir: Path) -> str:
    """``bpe`` (byte-level BPE in tokenizer.json) or ``spm`` (tokenizer.model); refused otherwise."""
    path = model_dir / "tokenizer.json"
    model = json.loads(path.read_text()).get("model", {}) if path.is_file() else {}
    if model.get("type") == "BPE" and not model.get("byte_fallback"):
        return "bpe"
    if (model_dir / "tokenizer.model").is_file():
        return "spm"
    raise BackpropError(
        ErrorCode.RUNTIME_EXPORT_ARCH_UNSUPPORTED,
        f"{model_dir} has neither a byte-level BPE tokenizer.json nor a SentencePiece tokenizer.model "
        f"(tokenizer.json model: {model.get('type')!r}, byte_fallback={model.get('byte_fallback')}); "
        "GGUF export writes those two kinds",
    )


def _parts(node: Any) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer and, for a Sequence, its members."""
    if not isinstance(node, dict):
        return []
    members = node.get("normalizers") or node.get("pretokenizers")
    return [node] + [p for m in members or [] for p in _parts(m)]


def hf_adds_space_prefix(tok_json: dict[str, Any]) -> bool | None:
    """Whether transformers' tokenizer.json puts "▁" in front of the text (None: it does not say).

    This, not the SentencePiece file, is what the model was trained with: a converted Llama-style
    tokenizer may prepend where the .model file's own flag says not to, or the other way round.
    """
    for part in _parts(tok_json.get("normalizer")):
        if part.get("type") == "Prepend":
            return True
    for part in _parts(tok_json.get("pre_tokenizer")):
        if part.get("type") == "Metaspace":
            scheme = part.get("prepend_scheme")
            if scheme is not None:
                return scheme in ("first", "always")
            return bool(part.get("add_prefix_space", True))
    if tok_json.get("normalizer") or tok_json.get("pre_tokenizer"):
        return False  # it spells out its normalization, and no prefix is part of it
    return None


def _special_text(tok_cfg: dict[str, Any], key: str) -> str | None:
    value = tok_cfg.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value or None


def add_spm_tokenizer(writer: Any, model_dir: Path, n_vocab: int) -> dict[str, Any]:
    """Write a SentencePiece vocabulary (``tokenizer.ggml.model = llama``); returns what it wrote."""
    import gguf

    spm = read_spm(model_dir / "tokenizer.model")
    tokens = [p[0] for p in spm.pieces]
    scores = [p[1] for p in spm.pieces]
    types = [p[2] for p in spm.pieces]  # SentencePiece's type numbers are gguf.TokenType's
    # Tokens added on top of the SentencePiece model (chat markers and the like).
    tok_json_path = model_dir / "tokenizer.json"
    added = json.loads(tok_json_path.read_text()).get("added_tokens", []) if tok_json_path.is_file() else []
    for token in added:
        i = int(token["id"])
        kind = gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED
        while len(tokens) <= i:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        if tokens[i] != token["content"] or types[i] == gguf.TokenType.NORMAL:
            tokens[i], scores[i], types[i] = token["content"], -1000.0, kind
    while len(tokens) < n_vocab:  # the embedding matrix may be padded past the tokenizer
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)

    cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    hf_prefix = (
        hf_adds_space_prefix(json.loads(tok_json_path.read_text())) if tok_json_path.is_file() else None
    )
    writer.add_add_space_prefix(spm.add_dummy_prefix if hf_prefix is None else hf_prefix)
    ids: dict[str, Any] = {}
    index = {t: i for i, t in enumerate(tokens)}
    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("pad_token", writer.add_pad_token_id),
        ("unk_token", writer.add_unk_token_id),
    ):
        text = _special_text(tok_cfg, key)
        if text is not None and text in index:
            add(index[text])
            ids[key] = index[text]
    # Does the tokenizer put BOS in front of every text? Its config or its post-processor says so.
    post = (
        json.dumps(json.loads(tok_json_path.read_text()).get("post_processor") or {})
        if tok_json_path.is_file()
        else ""
    )
    bos_text = _special_text(tok_cfg, "bos_token")
    add_bos = bool(tok_cfg.get("add_bos_token", bos_text is not None and f'"{bos_text}"' in post))
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(bool(tok_cfg.get("add_eos_token", False)))
    return {"tokens": len(tokens), "add_bos": add_bos, "texts": set(tokens), **ids}
