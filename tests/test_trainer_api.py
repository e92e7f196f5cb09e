"""The Python API: Trainer.train / evaluate / save on the tiny demo model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from backpropagate import BackpropError, ErrorCode, Trainer
from backpropagate.events import read_events
from backpropagate.training.run_ids import is_run_id

pytestmark = pytest.mark.slow

OPTIONS = dict(
    packing=False, max_seq_len=64, batch_size=4, grad_accum=2, lr=5e-3, lora_r=8, lora_alpha=16,
    eval_fraction=0.25, lr_scheduler="constant", seed=0,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory, home) -> Path:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    path = tmp_path_factory.mktemp("trainer") / "animals.jsonl"
    animals = ["cat", "dog", "cow", "hen", "pig", "owl", "fox", "bee"]
    sounds = ["meows", "barks", "moos", "clucks", "oinks", "hoots", "yelps", "buzzes"]
    rows = [
        {"messages": [{"role": "user", "content": f"What does a {a} do?"},
                      {"role": "assistant", "content": f"A {a} {s}."}]}
        for a, s in zip(animals, sounds, strict=True)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_evaluate_save(data, home, tmp_path, caplog):
    seen = []
    trainer = Trainer("demo", **OPTIONS)
    with caplog.at_level(logging.INFO, logger="backpropagate"):
        result = trainer.train(data, steps=6, callbacks=[seen.append])

    assert result.status == "completed" and result.step == 6 and is_run_id(result.run_id)
    assert result.run_dir == home / "runs" / result.run_id
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.final_loss == result.history[-1]["loss"] and result.eval_loss is not None
    assert result.adapter_path == result.run_dir / "adapter"
    # The run folder is a normal run: config, gapless event log; callbacks saw the stamped events.
    assert json.loads((result.run_dir / "config.json").read_text())["steps"] == 6
    logged = list(read_events(result.run_dir / "events.jsonl"))
    assert [e.seq for e in logged] == list(range(1, len(logged) + 1))
    assert [e.seq for e in seen] == [e.seq for e in logged] and seen[-1].type == "completed"
    assert {e.run_id for e in seen} == {result.run_id}
    ours = [r for r in caplog.records if r.name == "backpropagate.trainer"]
    assert ours and all(r.bound.get("run_id") == result.run_id for r in ours)

    # evaluate() reloads the saved adapter and finds the loss the run reported.
    scores = trainer.evaluate()
    assert scores["loss"] == pytest.approx(result.eval_loss, rel=1e-4)
    assert scores["perplexity"] == pytest.approx(2.718281828 ** scores["loss"], rel=1e-4)

    out = trainer.save(tmp_path / "copy")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (result.adapter_path / name).read_bytes()


def test_save_before_train_warns_and_writes_the_initial_adapter(data, tmp_path):
    trainer = Trainer("demo", **OPTIONS)
    with pytest.warns(UserWarning, match=r"before train\(\).*untrained initial adapter"):
        out = trainer.save(tmp_path / "initial")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and (out / "adapter_model.safetensors").is_file()


def test_bad_options_are_reported_before_anything_loads(data):
    with pytest.raises(BackpropError) as info:
        Trainer("demo", learning_rate=1e-3)
    assert info.value.code == ErrorCode.CONFIG_INVALID and "learning_rate" in info.value.message
    with pytest.raises(BackpropError) as info:
        Trainer("demo", lr=5, lora_r=0).train(data, steps=1)
    assert info.value.code == ErrorCode.CONFIG_INVALID
    assert "lr" in info.value.message and "lora_r" in info.value.message
