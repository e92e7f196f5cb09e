"""The demo tokenizer: byte-level round trips, special tokens, the ChatML template and its assistant mask."""

from __future__ import annotations

import pytest

from backpropagate.models.demo import build_tokenizer
from backpropagate.models.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, load_tokenizer

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "Grass is green."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize(
    "text",
    [
        "Once upon a time, there was a little cat named Anna.",
        "Héllo wörld — naïve café, Ærøskøbing, Straße",
        "日本語のテキストと中文",
        "emoji 🙂🚀👩‍👩‍👧 and math ∑ ∫ √2 ≈ 1.414",
        "  leading spaces, trailing spaces   ",
        "tabs\tand\r\nwindows\nnew  lines\n\n\n",
        "10 + 5 = 15; 3.14159; -42; 1e-9",
        "code: def f(x): return {'a': [1, 2]}  # comment",
        "",
    ],
)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
    assert tok.eos_token == EOS_TOKEN == "<|im_end|>"
    assert tok.pad_token == tok.bos_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tok.encode(special)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == special
    # No automatic bos/eos: the chat template and the data code decide where they go.
    assert tok.encode("hello")[0] not in tok.all_special_ids


def test_vocabulary_is_small_and_byte_complete(tok):
    assert 1000 <= len(tok) <= 4096
    # All 256 byte symbols are in the vocabulary, so nothing is ever unknown.
    assert all(tok.convert_tokens_to_ids(t) is not None for t in tok.backend_tokenizer.get_vocab())


def test_chat_template_renders_chatml(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat color is the sky?<|im_end|>\n"
        "<|im_start|>assistant\nThe sky is blue.<|im_end|>\n"
        "<|im_start|>user\nAnd grass?<|im_end|>\n"
        "<|im_start|>assistant\nGrass is green.<|im_end|>\n"
    )


def test_generation_prompt_opens_an_assistant_turn(tok):
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n")
    assert not tok.apply_chat_template(CHAT[:2], tokenize=False).endswith("assistant\n")


def _spans(mask):
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_assistant_mask_covers_content_and_end_token(tok):
    out = tok.apply_chat_template(CHAT, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    spans = _spans(mask)
    answers = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert len(spans) == len(answers)
    for (start, end), answer in zip(spans, answers, strict=True):
        # Exactly the answer and its <|im_end|>: the model learns to stop.
        assert tok.decode(ids[start:end]) == answer + "<|im_end|>"
        assert ids[end - 1] == tok.eos_token_id
        # The role header before and the newline after stay unmasked.
        assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
        assert tok.decode(ids[end : end + 1]) == "\n"
    # Everything unmasked is prompt: the system and user turns appear there in full.
    prompt = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "Answer briefly." in prompt and "And grass?" in prompt and "blue" not in prompt


def test_saved_folder_loads_with_identical_ids(tok, tmp_path):
    from transformers import Qwen2Config

    tok.save_pretrained(tmp_path)
    # A Qwen2 config beside it: AutoTokenizer would swap in Qwen2's own pre-tokenizer
    # (digits split one by one); load_tokenizer must keep the trained one.
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in ["10 + 5 = 15.", "It's   12 o'clock\r\n", "Héllo 🙂"]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.apply_chat_template(CHAT, tokenize=False) == tok.apply_chat_template(CHAT, tokenize=False)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert (tmp_path / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_tokenizer_build_is_deterministic(tok):
    again = build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
