"""Preference data for the preference objectives: pair rows and KTO rows as token ids.

A pair is ``{prompt, chosen, rejected}`` (each a string or a message list; the prompt may be a
whole conversation); a KTO row is ``{prompt, completion, label}``. The prompt is rendered with
the chat template and ``add_generation_prompt``, the response's tokens are appended, and labels
cover the response only. Truncation keeps the prompt (cut from the left only when it alone is
longer than half of ``max_seq_len``) and cuts the response at its end.

With ``objective=sft`` a pair trains on prompt + chosen (see ``Example.sft_messages``): that is the
deliberate choice, so one preference file serves both SFT and preference tuning. KTO also takes
pairs, as two unpaired rows (chosen desirable, rejected undesirable). SFT refuses KTO rows: half of
them are answers the user marked as unwanted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode

IGNORE = -100
PAIR_OBJECTIVES = frozenset({"dpo", "orpo", "simpo"})
NEEDS = {
    "dpo": "preference pairs {prompt, chosen, rejected}",
    "orpo": "preference pairs {prompt, chosen, rejected}",
    "simpo": "preference pairs {prompt, chosen, rejected}",
    "kto": "rows {prompt, completion, label} (label true for a desirable completion)",
}


def _messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _response_text(response: str | list[dict[str, str]]) -> str:
    return response if isinstance(response, str) else response[-1]["content"]


def prompt_ids(prompt: str | list[dict[str, str]], tokenizer: Any) -> list[int]:
    """The prompt rendered by the chat template, ending with the assistant's turn opening."""
    ids = tokenizer.apply_chat_template(_messages(prompt), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def response_ids(response: str | list[dict[str, str]], tokenizer: Any) -> list[int]:
    """The response's tokens, closed by the end-of-sequence token when the tokenizer has one."""
    ids = tokenizer(_response_text(response), add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    return [*ids, eos] if eos is not None else list(ids)


def join(prompt: list[int], response: list[int], max_seq_len: int) -> dict[str, list[int]]:
    """input_ids and labels (response only) under the truncation rule."""
    if len(prompt) > max_seq_len // 2:
        prompt = prompt[-(max_seq_len // 2) :]
    response = response[: max_seq_len - len(prompt)]
    return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}


def tokenize_pair(row: Mapping[str, Any], tokenizer: Any, max_seq_len: int) -> dict[str, list[int]]:
    """One pair as chosen_* and rejected_* input_ids / labels sharing the same prompt."""
    p = prompt_ids(row["prompt"], tokenizer)
    chosen = join(p, response_ids(row["chosen"], tokenizer), max_seq_len)
    rejected = join(p, response_ids(row["rejected"], tokenizer), max_seq_len)
    return {
        "chosen_input_ids": chosen["input_ids"],
        "chosen_labels": chosen["labels"],
        "rejected_input_ids": rejected["input_ids"],
        "rejected_labels": rejected["labels"],
    }


def tokenize_kto(row: Mapping[str, Any], tokenizer: Any, max_seq_len: int) -> dict[str, Any]:
    """One KTO row as input_ids / labels plus ``desirable``."""
    out: dict[str, Any] = join(
        prompt_ids(row["prompt"], tokenizer), response_ids(row["completion"], tokenizer), max_seq_len
    )
    out["desirable"] = bool(row["label"])
    return out


ACCEPTS = {
    "sft": frozenset({"sharegpt", "openai", "alpaca", "text", "preference"}),
    "dpo": frozenset({"preference"}),
    "orpo": frozenset({"preference"}),
    "simpo": frozenset({"preference"}),
    "kto": frozenset({"kto", "preference"}),
}


def check_objective_fits(objective: str, formats: Mapping[str, str]) -> None:
    """Fail before a model loads when the data set's files do not fit the objective."""
    wrong = {f: fmt for f, fmt in formats.items() if fmt not in ACCEPTS[objective]}
    if wrong and objective == "sft":
        listed = ", ".join(sorted(wrong))
        raise BackpropError(
            ErrorCode.DATASET_FORMAT_UNSUPPORTED,
            f"objective=sft cannot train on KTO rows {{prompt, completion, label}} ({listed}): "
            "the undesirable completions would be learned as answers",
            hint="Train with objective=kto, or keep only the desirable rows as a chat data set.",
        )
    if wrong:
        listed = ", ".join(f"{f} ({fmt})" for f, fmt in sorted(wrong.items()))
        raise BackpropError(
            ErrorCode.DATASET_FORMAT_UNSUPPORTED,
            f"objective={objective} needs {NEEDS[objective]}; these files are not: {listed}",
            hint=f"Use a data set of {NEEDS[objective]}, or train with objective=sft.",
        )


def tokenize_for_objective(
    example: Any, objective: str, tokenizer: Any, max_seq_len: int
) -> list[tuple[dict[str, Any], bool]]:
    """Rows of one Example for a preference objective, each with whether it was truncated.

    A pair gives one pair row (DPO, ORPO, SimPO) or two KTO rows; a KTO row gives one KTO row.
    """
    prompt = prompt_ids(example.messages, tokenizer)

    def cut(response: str) -> tuple[dict[str, list[int]], bool]:
        ids = response_ids(response, tokenizer)
        return join(prompt, ids, max_seq_len), len(prompt) + len(ids) > max_seq_len

    if objective in PAIR_OBJECTIVES:
        chosen, cut_c = cut(example.chosen)
        rejected, cut_r = cut(example.rejected)
        row = {
            "chosen_input_ids": chosen["input_ids"],
            "chosen_labels": chosen["labels"],
            "rejected_input_ids": rejected["input_ids"],
            "rejected_labels": rejected["labels"],
        }
        return [(row, cut_c or cut_r)]
    sides = (
        [(example.chosen, True), (example.rejected, False)]
        if example.kind == "preference"
        else [(example.completion, example.desirable)]
    )
    out = []
    for response, desirable in sides:
        row, was_cut = cut(response)
        out.append(({**row, "desirable": desirable}, was_cut))
    return out


def response_tokens(row: Mapping[str, Any]) -> int:
    """Response tokens of a preference row (the fewest of its sides): 0 means nothing to compare."""
    keys = ("chosen_labels", "rejected_labels") if "chosen_labels" in row else ("labels",)
    return min(sum(1 for t in row[k] if t != IGNORE) for k in keys)


def row_tokens(row: Mapping[str, Any]) -> int:
    """All tokens a training row puts through the model (both sides of a pair)."""
    if "chosen_input_ids" in row:
        return len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])
    return len(row["input_ids"])
