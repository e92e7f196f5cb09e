"""The New run form shows what a run will really use (the demo sizing for demo models, a preset's
values) and sends only the fields the user touched, so RunConfig fills the rest as at every door."""

from __future__ import annotations

from backpropagate.config import DEMO_DEFAULTS, DEMO_STEPS, RunConfig
from ui_app.pages.new_run import _START_VALUES, _where, form_to_config, shown_values


def test_a_demo_model_shows_the_demo_sizing_not_the_general_defaults() -> None:
    shown = shown_values(_START_VALUES, ())
    assert shown["model"] == "demo"
    assert (shown["batch_size"], shown["grad_accum"], shown["lr"]) == tuple(
        str(v) for v in DEMO_DEFAULTS.values()
    )
    assert shown["steps"] == str(DEMO_STEPS)
    # ... and that is what a run started from the untouched form gets.
    config = RunConfig.parse(form_to_config({**shown, "data": "x.jsonl"}, touched=()))
    assert (config.batch_size, config.grad_accum, config.lr, config.steps) == (1, 1, 5e-3, DEMO_STEPS)


def test_another_model_or_a_preset_changes_what_is_shown() -> None:
    general = RunConfig.model_fields
    hub = shown_values({**_START_VALUES, "model": "org/some-model"}, ())
    assert hub["batch_size"] == str(general["batch_size"].default) and hub["steps"] == ""
    quality = shown_values({**_START_VALUES, "preset": "quality"}, ())
    assert quality["lora_r"] == "64"


def test_only_touched_fields_are_sent_even_when_they_equal_a_default() -> None:
    shown = shown_values(_START_VALUES, ())
    # The user typed the general default batch size 2 on a demo run: it is kept, not replaced by 1.
    values = shown_values({**shown, "batch_size": "2", "data": "x.jsonl"}, ["batch_size"])
    sent = form_to_config(values, touched=["batch_size"])
    assert sent == {"batch_size": 2, "model": "demo", "method": "lora", "data": "x.jsonl"}
    assert values["batch_size"] == "2" and values["grad_accum"] == "1"  # the rest still shows the demo sizing
    assert RunConfig.parse(sent).batch_size == 2


def test_a_value_that_does_not_validate_yet_leaves_the_other_fields_shown() -> None:
    values = shown_values({**_START_VALUES, "lr": "abc"}, ["lr"])
    assert values["lr"] == "abc" and values["steps"] == str(DEMO_STEPS)


def test_data_errors_name_the_uploaded_file_and_line() -> None:
    stored = "/home/x/datasets/ds-9e93aa.jsonl"
    assert _where({"file": stored, "line": 3}, "my data.jsonl", stored) == "my data.jsonl, line 3"
    assert _where({"file": None, "line": None}, "my data.jsonl", stored) == "my data.jsonl"
    assert (
        _where({"file": "/d/part-2.jsonl", "line": 9}, "d", "/d") == "part-2.jsonl, line 9"
    )  # a folder's file
