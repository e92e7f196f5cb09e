"""`backprop train`'s options are generated from RunConfig: every field reachable, typed as the model expects."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import typer

from backpropagate.cli import app
from backpropagate.cli.train import build_config, option_name
from backpropagate.config import RunConfig


def train_command() -> Any:
    return typer.main.get_command(app).commands["train"]


def parse(*args: str) -> RunConfig:
    """The RunConfig `backprop train ARGS` would run with (click parses, as on a terminal)."""
    ctx = train_command().make_context("train", list(args))
    extra = {"resume", "config_file", "as_json"}
    return build_config({k: v for k, v in ctx.params.items() if k not in extra})


def test_every_runconfig_field_is_an_option_with_its_description():
    options = {opt: param for param in train_command().params for opt in param.opts}
    for field, info in RunConfig.model_fields.items():
        param = options.get(option_name(field))
        assert param is not None, f"RunConfig.{field} has no `backprop train` option"
        assert param.name == field
        assert (info.description or "").replace("`", "")[:30] in (param.help or "")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--batch-size", "auto"], {"batch_size": "auto"}),
        (["--batch-size", "3"], {"batch_size": 3}),
        (["--target-modules", "q_proj, v_proj"], {"target_modules": ["q_proj", "v_proj"]}),
        (["--target-modules", "all-linear"], {"target_modules": "all-linear"}),
        (["--gradient-checkpointing", "true"], {"gradient_checkpointing": True}),
        (["--use-liger", "auto"], {"use_liger": "auto"}),
        (["--use-dora"], {"use_dora": True}),
        (["--no-oom-recovery"], {"oom_recovery": False}),
        (["--optimizer", "adamw_8bit"], {"optimizer": "adamw_8bit"}),
        (["--temp-pause-c", "85", "--temp-emergency-c", "92"], {"temp_pause_c": 85, "temp_emergency_c": 92}),
        (["-o", "/tmp/out"], {"output_dir": "/tmp/out"}),
    ],
)
def test_options_reach_the_config(args, expected):
    config = parse("--data", "x.jsonl", *args)
    assert {k: getattr(config, k) for k in expected} == expected


def test_a_literal_field_offers_its_choices_and_refuses_others():
    with pytest.raises(typer.BadParameter, match="adamw_8bit"):
        parse("--data", "x.jsonl", "--optimizer", "sgd")


def test_demo_defaults_are_the_configs_own():
    """The CLI adds no defaults of its own: the same demo sizing as RunConfig applies."""
    assert parse("--data", "x.jsonl") == RunConfig.parse({"data": "x.jsonl"})
    assert parse("--data", "x.jsonl", "--steps", "80").batch_size == RunConfig(data="x").batch_size


def test_help_lists_examples_and_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "backpropagate", "train", "--help"],
        capture_output=True, text=True, env={"COLUMNS": "200", "PATH": ""},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Examples:" in out.stdout and "--gradient-checkpointing" in out.stdout
    assert "auto|INT" in out.stdout  # a mixed field says what it takes
