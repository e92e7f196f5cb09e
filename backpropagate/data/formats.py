"""Detect a data file's format and normalize its rows to one internal shape.

Formats: ShareGPT (``conversations`` of from/value), OpenAI chat (``messages`` of role/content),
Alpaca (instruction/input/output), raw text (``text``), preference pairs
(prompt/chosen/rejected) and KTO rows (prompt/completion/label). Every row becomes an
:class:`Example`: a conversation (list of ``{role, content}``), a text, a preference pair or a
rated completion. A row that does not fit raises
:class:`RowError` with a message a user can act on; the loader adds file and line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["sharegpt", "openai", "alpaca", "text", "preference", "kto"]
FORMATS: tuple[Format, ...] = ("sharegpt", "openai", "alpaca", "text", "preference", "kto")

# The key that identifies each format, checked in this order (a preference row may also carry
# `text`; an Alpaca row may carry `text` too, as some exports do).
_SIGNATURES: tuple[tuple[Format, tuple[str, ...]], ...] = (
    ("sharegpt", ("conversations",)),
    ("openai", ("messages",)),
    ("preference", ("chosen", "rejected")),
    # `label` rather than `completion`: prompt/completion without a label is plain SFT data.
    ("kto", ("label",)),
    ("alpaca", ("instruction",)),
    ("text", ("text",)),
)

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "developer": "system"}


class RowError(ValueError):
    """A row that cannot be used; the message says what is wrong with it."""


@dataclass
class Example:
    """One normalized row, with where it came from."""

    kind: Literal["chat", "text", "preference", "kto"]
    source: str
    line: int
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str = ""
    chosen: str = ""
    rejected: str = ""
    completion: str = ""
    desirable: bool = True

    def sft_messages(self) -> list[dict[str, str]]:
        """The conversation SFT trains on; a preference pair trains on prompt + chosen."""
        if self.kind == "preference":
            return [*self.messages, {"role": "assistant", "content": self.chosen}]
        if self.kind == "kto":  # only for token counts: SFT refuses KTO rows (see check_objective_fits)
            return [*self.messages, {"role": "assistant", "content": self.completion}]
        return self.messages

    def to_preview(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "source": self.source, "line": self.line}
        if self.kind == "text":
            out["text"] = self.text
        else:
            out["messages"] = self.messages
        if self.kind == "preference":
            out["chosen"], out["rejected"] = self.chosen, self.rejected
        if self.kind == "kto":
            out["completion"], out["label"] = self.completion, self.desirable
        return out


def row_format(record: dict[str, Any]) -> Format | None:
    """The format a single row looks like, from its identifying keys (None: none of them).

    A key holding null does not count: Parquet and `datasets` tables give every row every column.
    """
    for fmt, keys in _SIGNATURES:
        if any(record.get(k) is not None for k in keys):
            return fmt
    return None


def normalize(record: dict[str, Any], fmt: Format, source: str, line: int) -> Example:
    """Turn one raw row into an Example, or raise RowError saying what is wrong."""
    if fmt == "sharegpt":
        return Example("chat", source, line, messages=_sharegpt(record))
    if fmt == "openai":
        return Example("chat", source, line, messages=_openai(record))
    if fmt == "alpaca":
        return Example("chat", source, line, messages=_alpaca(record))
    if fmt == "text":
        return Example("text", source, line, text=_nonempty_str(record, "text"))
    if fmt == "kto":
        prompt, completion, desirable = _kto(record)
        return Example("kto", source, line, messages=prompt, completion=completion, desirable=desirable)
    prompt, chosen, rejected = _preference(record)
    return Example("preference", source, line, messages=prompt, chosen=chosen, rejected=rejected)


def check_turns(messages: list[dict[str, str]], *, need_assistant_last: bool = True) -> None:
    """System first (optional), then user and assistant alternating, user first."""
    if not messages:
        raise RowError("conversation is empty")
    expected = "user"
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "system":
            if i != 0:
                raise RowError(f"message {i + 1}: a system message may only come first")
            continue
        if role != expected:
            if i == 0 or (i == 1 and messages[0]["role"] == "system"):
                raise RowError(f"message {i + 1}: conversation must start with a user message, not {role}")
            raise RowError(f"message {i + 1}: two {role} messages in a row (expected {expected})")
        expected = "assistant" if role == "user" else "user"
    if need_assistant_last and messages[-1]["role"] != "assistant":
        raise RowError("conversation must end with an assistant message (nothing to learn from)")


def _nonempty_str(record: dict[str, Any], key: str, where: str = "") -> str:
    if key not in record or record[key] is None:
        raise RowError(f"{where}missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise RowError(f"{where}field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"{where}field {key!r} is empty")
    return value


def _content(value: Any, where: str) -> str:
    # OpenAI allows content as a list of parts; only text parts can be trained on here.
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowError(f"{where}content part of type {kind!r} is not supported (text only)")
            parts.append(str(part.get("text", "")))
        value = "".join(parts)
    if value is None:
        raise RowError(f"{where}missing content")
    if not isinstance(value, str):
        raise RowError(f"{where}content must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"{where}empty content")
    return value


def _messages(
    items: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise RowError(f"field {key!r} must be a list of messages, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items, start=1):
        where = f"message {i}: "
        if not isinstance(item, dict):
            raise RowError(f"{where}expected an object with {role_key!r} and {content_key!r}")
        if role_key not in item:
            raise RowError(f"{where}missing field {role_key!r}")
        raw_role = item[role_key]
        role = roles.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RowError(f"{where}unknown role {raw_role!r} (expected one of {', '.join(sorted(roles))})")
        out.append({"role": role, "content": _content(item.get(content_key), where)})
    check_turns(out)
    return out


def _sharegpt(record: dict[str, Any]) -> list[dict[str, str]]:
    msgs = _messages(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    return _with_system(record, msgs)


def _openai(record: dict[str, Any]) -> list[dict[str, str]]:
    return _messages(record.get("messages"), "messages", "role", "content", OPENAI_ROLES)


def _with_system(record: dict[str, Any], msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    system = record.get("system")
    if isinstance(system, str) and system.strip() and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system}, *msgs]
    return msgs


def _alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _nonempty_str(record, "instruction")
    output = _nonempty_str(record, "output")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowError(f"field 'input' must be a string, got {type(extra).__name__}")
    # The classic Alpaca layout: the optional input follows the instruction after a blank line.
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return _with_system(record, [{"role": "user", "content": user}, {"role": "assistant", "content": output}])


def _side(value: Any, key: str) -> str:
    """A preference side: a string, or a list whose last message is the assistant's answer."""
    if isinstance(value, list):
        if not value or not isinstance(value[-1], dict):
            raise RowError(f"field {key!r} must hold an assistant message")
        last = value[-1]
        if last.get("role") != "assistant":
            raise RowError(
                f"field {key!r}: last message must be from the assistant, not {last.get('role')!r}"
            )
        return _content(last.get("content"), f"field {key!r}: ")
    return _nonempty_str({key: value}, key)


def _preference(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, str]:
    for key in ("prompt", "chosen", "rejected"):
        if key not in record or record[key] is None:
            raise RowError(f"missing field {key!r}")
    messages = _prompt(record)
    return messages, _side(record["chosen"], "chosen"), _side(record["rejected"], "rejected")


_LABELS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _kto(record: dict[str, Any]) -> tuple[list[dict[str, str]], str, bool]:
    for key in ("prompt", "completion", "label"):
        if key not in record or record[key] is None:
            raise RowError(f"missing field {key!r}")
    label = record["label"]
    if isinstance(label, str) and label.strip().lower() in _LABELS:
        label = _LABELS[label.strip().lower()]
    if isinstance(label, int) and label in (0, 1):  # bool is an int too
        label = bool(label)
    if not isinstance(label, bool):
        raise RowError(f"field 'label' must be true or false (desirable or not), got {record['label']!r}")
    return _prompt(record), _side(record["completion"], "completion"), label


def _prompt(record: dict[str, Any]) -> list[dict[str, str]]:
    """A preference or KTO prompt: a string, or a conversation ending with the user's turn."""
    prompt = record["prompt"]
    if isinstance(prompt, list):
        messages = []
        for i, item in enumerate(prompt, start=1):
            if not isinstance(item, dict) or item.get("role") not in OPENAI_ROLES:
                raise RowError(f"prompt message {i}: expected an object with a known 'role'")
            messages.append(
                {
                    "role": OPENAI_ROLES[item["role"]],
                    "content": _content(item.get("content"), f"prompt message {i}: "),
                }
            )
        check_turns(messages, need_assistant_last=False)
        if messages[-1]["role"] != "user":
            raise RowError("prompt must end with a user message")
    else:
        messages = [{"role": "user", "content": _nonempty_str(record, "prompt")}]
    return _with_system(record, messages)


def describe_keys(records: Iterable[dict[str, Any]], limit: int = 12) -> str:
    keys: list[str] = []
    for rec in records:
        for k in rec:
            if k not in keys:
                keys.append(k)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (", ..." if len(keys) > limit else "") if keys else "(no keys)"
