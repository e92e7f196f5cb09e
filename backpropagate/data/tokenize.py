"""Turn normalized examples into token ids and labels with the model's chat template.

Labels are -100 (ignored by the loss) everywhere except the tokens the model should learn:
the assistant's turns (``train_on="responses"``, the default) or every token (``"all"``).
Raw text is trained on every token. A preference pair trains on prompt + chosen for SFT.

Assistant spans come from the template's ``{% generation %}`` blocks when it has them, else from
rendering each prefix of the conversation and taking the characters an assistant turn adds.
The first label of every example is -100: in a packed sequence the token before it belongs to
another example, and predicting across that boundary would leak one example into the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from backpropagate.data.formats import Example
from backpropagate.errors import BackpropError, ErrorCode

IGNORE = -100

# Used when a tokenizer has no chat template of its own (base models): plain ChatML.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Tokenized:
    """One example as token ids and labels, and whether it was cut to fit."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    length: int = 0  # before truncation

    def as_dict(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def chat_template(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one trains
        template = template.get("default") or next(iter(template.values()))
    return template or DEFAULT_CHAT_TEMPLATE


def tokenize_example(
    example: Example,
    tokenizer: Any,
    *,
    max_seq_len: int,
    train_on: Literal["responses", "all"] = "responses",
) -> Tokenized:
    """Token ids and labels of one example, truncated to ``max_seq_len``."""
    if example.kind == "text":
        ids, mask = _text_ids(example.text, tokenizer)
    else:
        try:
            ids, mask = _chat_ids(example.sft_messages(), tokenizer, example, train_on == "responses")
        except BackpropError:
            raise
        except Exception as exc:  # jinja raises from inside templates (e.g. "system role not supported")
            raise BackpropError(
                ErrorCode.CONFIG_INVALID_SETTING,
                f"{example.source}:{example.line}: the model's chat template refused this conversation: "
                f"{type(exc).__name__}: {exc}",
                hint="Remove the message kind the template refuses (often the system message), "
                "or pick a model whose template accepts it.",
            ) from None
    if train_on == "all":
        mask = [True] * len(ids)
    labels = [tok if keep else IGNORE for tok, keep in zip(ids, mask, strict=True)]
    if labels:
        labels[0] = IGNORE
    length = len(ids)
    return Tokenized(ids[:max_seq_len], labels[:max_seq_len], length > max_seq_len, length)


def _text_ids(text: str, tokenizer: Any) -> tuple[list[int], list[bool]]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # so the model learns where a document ends
    return ids, [True] * len(ids)


def _chat_ids(
    messages: list[dict[str, str]], tokenizer: Any, example: Example, find_responses: bool
) -> tuple[list[int], list[bool]]:
    template = chat_template(tokenizer)
    if not find_responses:
        text = _render(tokenizer, template, messages, False)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids, [True] * len(ids)
    # Generation blocks map to tokens through character offsets: fast tokenizers only.
    if _GENERATION.search(template) and getattr(tokenizer, "is_fast", False):
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = list(out["input_ids"])
        return ids, [bool(m) for m in out["assistant_masks"]]
    return _chat_ids_by_prefix(messages, tokenizer, template, example)


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]], gen: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=gen
    )


def _chat_ids_by_prefix(
    messages: list[dict[str, str]], tokenizer: Any, template: str, example: Example
) -> tuple[list[int], list[bool]]:
    full = _render(tokenizer, template, messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], True)
        upto = _render(tokenizer, template, messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise BackpropError(
                ErrorCode.CONFIG_INVALID_SETTING,
                f"{example.source}:{example.line}: the model's chat template renders a conversation "
                "differently from its beginning, so assistant turns cannot be located.",
                hint="Use train_on='all', or a chat template with {% generation %} blocks.",
            )
        # The turn's trailing newline is layout, not something the model must say.
        spans.append((len(before), len(upto.rstrip("\n"))))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        mask = []
        for start, end in enc["offset_mapping"]:
            mask.append(any(start < s_end and end > s_start for s_start, s_end in spans))
        return list(enc["input_ids"]), mask
    # No character offsets: count the tokens of each prefix instead. Turn boundaries sit on
    # special tokens in chat templates, so a prefix tokenizes to a prefix of the whole.
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    mask = [False] * len(ids)
    for s_start, s_end in spans:
        first = len(tokenizer(full[:s_start], add_special_tokens=False)["input_ids"])
        last = len(tokenizer(full[:s_end], add_special_tokens=False)["input_ids"])
        mask[first:last] = [True] * (last - first)
    return ids, mask
