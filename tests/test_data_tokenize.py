"""Tokenization: label masks cover exactly the assistant text (or everything), per format."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from backpropagate.data.formats import Example
from backpropagate.data.loading import load_examples
from backpropagate.data.tokenize import IGNORE, tokenize_example
from backpropagate.errors import BackpropError, ErrorCode

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    from backpropagate.models.demo import build_tokenizer

    return build_tokenizer()


def trained_runs(tok, ids, labels):
    """Decode each contiguous run of trained positions."""
    runs, current = [], []
    for i, (tid, lab) in enumerate(zip(ids, labels, strict=True)):
        if lab != IGNORE:
            assert lab == tid, f"label at {i} differs from the input token"
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(r) for r in runs]


@pytest.mark.parametrize("name", ["quickstart.jsonl", "sharegpt.jsonl", "alpaca.json", "openai.parquet"])
def test_only_assistant_turns_are_trained(tok, name):
    for ex in load_examples(EXAMPLES / name).examples:
        t = tokenize_example(ex, tok, max_seq_len=4096)
        expected = [m["content"] + END for m in ex.messages if m["role"] == "assistant"]
        assert trained_runs(tok, t.input_ids, t.labels) == expected
        assert not t.truncated and t.length == len(t.input_ids)


def test_preference_trains_on_prompt_plus_chosen(tok):
    for ex in load_examples(EXAMPLES / "preference.jsonl").examples:
        t = tokenize_example(ex, tok, max_seq_len=4096)
        assert trained_runs(tok, t.input_ids, t.labels) == [ex.chosen + END]
        text = tok.decode(t.input_ids)
        assert ex.messages[0]["content"] in text and ex.rejected not in text


def test_text_trains_every_token_but_the_first_and_ends_with_eos(tok):
    ex = load_examples(EXAMPLES / "text.jsonl").examples[0]
    t = tokenize_example(ex, tok, max_seq_len=4096)
    assert t.input_ids[-1] == tok.eos_token_id
    assert tok.decode(t.input_ids[:-1]) == ex.text
    assert t.labels == [IGNORE, *t.input_ids[1:]]


def test_train_on_all_trains_the_prompt_too(tok):
    ex = load_examples(EXAMPLES / "quickstart.jsonl").examples[0]
    t = tokenize_example(ex, tok, max_seq_len=4096, train_on="all")
    assert t.labels == [IGNORE, *t.input_ids[1:]]
    assert ex.messages[0]["content"] in tok.decode(t.input_ids)


def test_template_without_generation_blocks_gives_the_same_labels(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    assert "{% generation %}" not in plain.chat_template
    for ex in load_examples(EXAMPLES / "sharegpt.jsonl").examples[:10]:
        a = tokenize_example(ex, tok, max_seq_len=4096)
        b = tokenize_example(ex, plain, max_seq_len=4096)
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)


def test_tokenizer_without_template_gets_chatml(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    ex = Example(
        "chat", "x", 1, messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    )
    t = tokenize_example(ex, bare, max_seq_len=100)
    assert tok.decode(t.input_ids).startswith("<|im_start|>user\nHi")
    assert trained_runs(tok, t.input_ids, t.labels) == ["Yo" + END]


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    )
    ex = Example(
        "chat",
        "f.jsonl",
        7,
        messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    )
    with pytest.raises(BackpropError) as exc:
        tokenize_example(ex, odd, max_seq_len=100)
    assert exc.value.code == ErrorCode.CONFIG_INVALID_SETTING and "f.jsonl:7" in exc.value.message
    # The way out the hint offers works: training on every token needs no turn boundaries.
    t = tokenize_example(ex, odd, max_seq_len=100, train_on="all")
    assert tok.decode(t.input_ids) == "a\nLAST b\n" and t.labels == [IGNORE, *t.input_ids[1:]]


def test_truncation_cuts_to_max_seq_len_and_says_so(tok):
    ex = load_examples(EXAMPLES / "sharegpt.jsonl").examples[0]
    full = tokenize_example(ex, tok, max_seq_len=4096)
    cut = tokenize_example(ex, tok, max_seq_len=20)
    assert cut.truncated and cut.length == len(full.input_ids) > 20
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


def test_template_that_injects_a_default_system_prompt(tok):
    # Like several hub models' templates: a default system turn when the data has none, and no
    # generation blocks, so assistant turns are found by rendering each prefix.
    injecting = copy.deepcopy(tok)
    injecting.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    for ex in load_examples(EXAMPLES / "sharegpt.jsonl").examples[:6]:
        t = tokenize_example(ex, injecting, max_seq_len=4096)
        expected = [m["content"] + END for m in ex.messages if m["role"] == "assistant"]
        assert trained_runs(tok, t.input_ids, t.labels) == expected
        assert tok.decode(t.input_ids).startswith("<|im_start|>system\n")


class _NoOffsets:
    """A tokenizer without character offsets (like slow, Python-only tokenizers)."""

    is_fast = False

    def __init__(self, inner):
        self.inner = inner
        self.chat_template = inner.chat_template.replace("{% generation %}", "").replace(
            "{% endgeneration %}", ""
        )
        self.eos_token_id = inner.eos_token_id

    def __call__(self, text, add_special_tokens=True, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return {"input_ids": self.inner(text, add_special_tokens=add_special_tokens)["input_ids"]}

    def apply_chat_template(self, *args, **kwargs):
        return self.inner.apply_chat_template(*args, **kwargs)


def test_tokenizer_without_offsets_gets_the_same_labels(tok):
    slow = _NoOffsets(tok)
    for ex in load_examples(EXAMPLES / "sharegpt.jsonl").examples[:10]:
        a = tokenize_example(ex, tok, max_seq_len=4096)
        b = tokenize_example(ex, slow, max_seq_len=4096)
        assert (a.input_ids, a.labels) == (b.input_ids, b.labels)
