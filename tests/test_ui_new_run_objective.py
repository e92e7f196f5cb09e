"""The New run page's objective: its own knobs only, the data fit said at once, sent like any field."""

from __future__ import annotations

import pytest

from backpropagate.config import RunConfig
from backpropagate.data.preference import ACCEPTS
from ui_app.pages.new_run import (
    _START_VALUES,
    BASIC_FIELDS,
    FIELDS,
    OBJECTIVE_FIELDS,
    OBJECTIVES,
    _objective_knobs,
    form_to_config,
    knobs_shown,
    objective_fit,
    shown_values,
)


@pytest.mark.parametrize(
    ("objective", "knobs"),
    [
        ("sft", []),
        ("dpo", ["beta", "dpo_loss_type", "label_smoothing"]),
        ("orpo", ["orpo_lambda"]),
        ("simpo", ["simpo_beta", "simpo_gamma"]),
        ("kto", ["beta", "kto_desirable_weight", "kto_undesirable_weight"]),
    ],
)
def test_each_objective_shows_only_its_own_knobs(objective: str, knobs: list[str]) -> None:
    assert knobs_shown(objective) == knobs
    assert all(k in RunConfig.model_fields for k in knobs)


def test_the_objective_and_its_knobs_are_not_in_the_other_sections() -> None:
    assert list(ACCEPTS) == OBJECTIVES
    assert {f["name"] for f in FIELDS} >= OBJECTIVE_FIELDS  # still RunConfig fields of the form
    assert not OBJECTIVE_FIELDS & set(BASIC_FIELDS)
    rendered = str(_objective_knobs())
    for knob in OBJECTIVE_FIELDS - {"objective"}:
        # Each knob's input is rendered under a condition on the objective, with its description.
        assert f'"field-{knob}"' in rendered, knob
        help_text = RunConfig.model_fields[knob].description or ""
        assert help_text and help_text.split("`")[0][:30] in rendered, knob
    assert "dpo" in rendered and "kto" in rendered and "simpo" in rendered


def test_a_file_that_fits_says_nothing_and_one_that_does_not_says_why() -> None:
    pairs = {"/d/ds-1.jsonl": "preference"}
    chat = {"/d/ds-2.jsonl": "openai"}
    rated = {"/d/ds-3.jsonl": "kto"}
    for objective in OBJECTIVES:
        assert objective_fit(objective, pairs) == ""  # pairs train every objective
    assert objective_fit("sft", chat) == "" and objective_fit("kto", rated) == ""
    assert objective_fit("dpo", {}) == ""  # nothing checked yet: no verdict
    said = objective_fit("dpo", chat)
    assert said.startswith("dpo needs preference pairs {prompt, chosen, rejected}; this file is openai chat")
    assert "kto" in objective_fit("orpo", rated) and "orpo needs" in objective_fit("orpo", rated)
    assert objective_fit("sft", rated).startswith("sft cannot train on KTO rated rows")
    both = objective_fit("simpo", {"a.jsonl": "openai", "b.jsonl": "alpaca"})
    assert "these files are Alpaca instructions and openai chat" in both


def test_the_objective_and_touched_knobs_are_sent_like_other_fields() -> None:
    values = shown_values({**_START_VALUES, "data": "x.jsonl", "objective": "dpo"}, ["objective"])
    assert values["beta"] == "0.1" and values["dpo_loss_type"] == "sigmoid"  # the defaults, shown
    values = shown_values({**values, "beta": "0.3"}, ["objective", "beta"])
    sent = form_to_config(values, touched=["objective", "beta"])
    assert sent["objective"] == "dpo" and sent["beta"] == 0.3
    assert "dpo_loss_type" not in sent and "label_smoothing" not in sent  # untouched: RunConfig's default
    config = RunConfig.parse(sent)
    assert (config.objective, config.beta, config.dpo_loss_type) == ("dpo", 0.3, "sigmoid")


def test_the_preview_shows_both_answers_of_a_pair_and_a_rated_completion() -> None:
    from ui_app.pages.new_run import _bubbles

    prompt = [{"role": "user", "content": "Hi"}]
    pair = _bubbles({"kind": "preference", "messages": prompt, "chosen": "Hello!", "rejected": "Go away."})
    assert [t["role"] for t in pair["turns"]] == ["user", "chosen", "rejected"]
    rated = _bubbles({"kind": "kto", "messages": prompt, "completion": "Go away.", "label": False})
    assert rated["turns"][-1] == {"role": "completion (undesirable)", "content": "Go away."}
