import json

import pytest

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.settings import Settings


def test_defaults_are_sane():
    cfg = RunConfig(data="x.jsonl", model="org/model")
    assert cfg.method == "lora" and cfg.train_on == "responses"
    assert cfg.packing and cfg.oom_recovery and cfg.effective_batch_size == 8
    assert RunConfig(data="x.jsonl").model == "demo"


def test_demo_defaults_are_the_same_through_every_door():
    """A demo run is sized for a CPU whether or not steps are given, and a preset's lr wins."""
    from backpropagate.config import DEMO_DEFAULTS, DEMO_STEPS

    bare = RunConfig(data="x.jsonl")
    with_steps = RunConfig.parse({"data": "x.jsonl", "model": "demo-llama", "steps": 80})
    for cfg in (bare, with_steps):
        assert (cfg.batch_size, cfg.grad_accum, cfg.lr) == tuple(DEMO_DEFAULTS.values())
    assert bare.steps == DEMO_STEPS and with_steps.steps == 80
    assert RunConfig(data="x", epochs=2).steps is None  # epochs given: no step count imposed
    given = RunConfig(data="x", batch_size=4, grad_accum=2, lr=5e-4)
    assert (given.batch_size, given.grad_accum, given.lr) == (4, 2, 5e-4)
    assert RunConfig(data="x", preset="quality").lr == 1e-4
    saved = RunConfig.model_validate_json(bare.model_dump_json())
    assert saved == bare  # a saved config loads back unchanged


def test_all_problems_reported_at_once():
    with pytest.raises(BackpropError) as exc:
        RunConfig.parse({"data": "x", "lr": -1, "lora_r": 0, "method": "dpo", "bogus": 1})
    err = exc.value
    assert err.code == ErrorCode.CONFIG_INVALID
    fields = {p.split(":")[0] for p in err.details["problems"]}
    assert {"lr", "lora_r", "method", "bogus"} <= fields


def test_cross_field_rules():
    with pytest.raises(BackpropError, match="temp_resume_c"):
        RunConfig.parse({"data": "x", "temp_pause_c": 70})
    with pytest.raises(BackpropError, match="qlora"):
        RunConfig.parse({"data": "x", "method": "qlora", "device": "cpu"})


def test_preset_fills_only_unset_fields():
    cfg = RunConfig(data="x", preset="quality")
    assert cfg.lora_r == 64 and cfg.use_rslora and cfg.lr == 1e-4
    cfg = RunConfig(data="x", preset="quality", lora_r=8)
    assert cfg.lora_r == 8 and cfg.lora_alpha == 64


def test_round_trip_through_json(tmp_path):
    cfg = RunConfig(data="d.jsonl", steps=5, batch_size="auto", target_modules=["q_proj"])
    cfg.save(tmp_path / "config.json")
    assert RunConfig.load(tmp_path / "config.json") == cfg
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == "auto"


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(tmp_path))
    monkeypatch.setenv("BACKPROPAGATE_SERVER__PORT", "9123")
    s = Settings()
    assert s.home == tmp_path and s.server.port == 9123
    assert s.database_url == f"sqlite:///{tmp_path / 'backprop.db'}"
