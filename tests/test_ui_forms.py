"""The new-run form is RunConfig: its fields, defaults and errors; plus the table and export helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.runs.hub import LogTail
from ui_app.pages.new_run import DEFAULTS, FIELDS, STEP_FIELDS, form_to_config
from ui_app.pages.runs import run_row
from ui_app.state import service


def test_form_has_every_runconfig_field_with_its_default() -> None:
    names = {f["name"] for f in FIELDS}
    assert names | STEP_FIELDS == set(RunConfig.model_fields)
    assert DEFAULTS["lr"] == str(RunConfig.model_fields["lr"].default)
    by_name = {f["name"]: f for f in FIELDS}
    assert by_name["lr_scheduler"]["choices"] == ["cosine", "linear", "constant"]
    assert by_name["oom_recovery"]["choices"] == ["true", "false"]
    assert by_name["batch_size"]["choices"] == []  # an int or "auto": free text
    assert all(f["help"] for f in FIELDS)


def test_untouched_form_gives_runconfig_defaults() -> None:
    values = {**DEFAULTS, "data": "x.jsonl", "model": "demo", "method": "lora", "preset": ""}
    config = RunConfig.parse(form_to_config(values))
    assert config == RunConfig(data="x.jsonl")


def test_changed_fields_are_typed_and_presets_still_apply() -> None:
    values = {**DEFAULTS, "data": "x.jsonl", "model": "demo", "method": "lora", "preset": "quality"}
    values |= {"steps": "40", "lr": "0.001", "packing": "false", "batch_size": "auto", "name": "123"}
    raw = form_to_config(values)
    assert raw["steps"] == 40 and raw["lr"] == 0.001 and raw["packing"] is False
    assert raw["batch_size"] == "auto" and raw["name"] == "123"
    config = RunConfig.parse(raw)
    assert config.lora_r == 64  # from the preset, since the form did not change lora_r


def test_invalid_values_come_back_as_runconfig_problems() -> None:
    values = {**DEFAULTS, "data": "x.jsonl", "model": "demo", "method": "full", "preset": ""}
    with pytest.raises(BackpropError) as info:
        RunConfig.parse(form_to_config(values | {"lr": "5", "lora_r": "0"}))
    assert info.value.code == ErrorCode.CONFIG_INVALID
    problems = info.value.details["problems"]
    assert any(p.startswith("lr:") for p in problems) and any(p.startswith("lora_r:") for p in problems)
    with pytest.raises(BackpropError) as info:
        RunConfig.parse(form_to_config(values | {"use_dora": "true"}))
    assert any("use_dora" in p for p in info.value.details["problems"])


def test_run_row_formats_progress_eta_and_gpu() -> None:
    row = run_row(
        {"id": "r1", "status": "running", "step": 25, "total_steps": 100, "loss": 1.23456,
         "tokens_per_s": 12345.6, "started_at": 1000.0, "gpus": [0, 1], "config": {"model": "demo"}},
        now=1050.0,
    )  # fmt: skip
    assert row["progress"] == 25 and row["steps"] == "25/100"
    assert row["loss"] == "1.2346" and row["tps"] == "12,346"
    assert row["eta"] == "2m 30s"  # 2 s a step, 75 left
    assert row["gpu"] == "0,1" and row["active"] == "1" and row["resumable"] == ""
    done = run_row({"id": "r2", "status": "cancelled", "step": 3, "total_steps": None})
    assert done["gpu"] == "CPU" and done["resumable"] == "1" and done["eta"] == ""


def test_event_tail_reads_only_whole_lines(isolated_home: Path) -> None:
    # The run page follows the hub's stream; its one incremental reader is hub.LogTail.
    run_dir = isolated_home / "runs" / "r1"
    run_dir.mkdir(parents=True)
    log = run_dir / "events.jsonl"
    first = json.dumps({"type": "status", "seq": 1, "status": "running"})
    second = json.dumps({"type": "status", "seq": 2, "status": "paused"})
    log.write_text(first + "\n" + second[:12])  # a write in progress
    tail = LogTail(log)
    assert [e.seq for e in tail.read()] == [1]
    with log.open("a") as fh:
        fh.write(second[12:] + "\n")
    assert [e.seq for e in tail.read()] == [2]
    assert tail.read() == []


def test_run_dir_refuses_paths() -> None:
    for bad in ("../etc", "a/b", ".hidden", ""):
        with pytest.raises(BackpropError):
            service.run_dir(bad)


def test_a_list_field_is_comma_separated_text():
    assert DEFAULTS["report_to"] == "" and all("PydanticUndefined" not in f["default"] for f in FIELDS)
    values = {**DEFAULTS, "data": "x.jsonl", "model": "demo", "report_to": "tensorboard"}
    assert RunConfig.parse(form_to_config(values)).report_to == ["tensorboard"]
    assert RunConfig.parse(form_to_config({**values, "report_to": ""})).report_to == []
