"""Preference data on the demo tokenizer, and runs whose data or method does not fit the objective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.data.preference import IGNORE, check_objective_fits, tokenize_kto, tokenize_pair
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.training import run_training

pytestmark = pytest.mark.slow

PAIRS = [
    {"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1)}
    for a in range(4)
    for b in range(4)
]


@pytest.fixture(scope="module")
def demo_tokenizer(home):
    from backpropagate.models.demo import resolve_model
    from backpropagate.training.backends import load_tokenizer

    return load_tokenizer(resolve_model("demo"))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pair_labels_cover_the_response_only(demo_tokenizer):
    row = tokenize_pair(PAIRS[5], demo_tokenizer, max_seq_len=64)
    for side in ("chosen", "rejected"):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert len(ids) == len(labels)
        n_prompt = next(i for i, t in enumerate(labels) if t != IGNORE)
        assert labels[n_prompt:] == ids[n_prompt:]
    n = next(i for i, t in enumerate(row["chosen_labels"]) if t != IGNORE)
    assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n]  # the same prompt


def test_truncation_keeps_prompt_and_cuts_response_end(demo_tokenizer):
    long = {"prompt": "Say it.", "chosen": "word " * 200, "rejected": "no"}
    row = tokenize_pair(long, demo_tokenizer, max_seq_len=32)
    assert len(row["chosen_input_ids"]) == 32
    full = tokenize_pair(long, demo_tokenizer, max_seq_len=4096)
    assert row["chosen_input_ids"] == full["chosen_input_ids"][:32]
    huge_prompt = {"prompt": "word " * 200, "completion": "yes", "label": True}
    kto = tokenize_kto(huge_prompt, demo_tokenizer, max_seq_len=32)
    assert kto["desirable"] is True
    assert kto["labels"].count(IGNORE) == 16  # prompt cut from the left to half the budget


def test_objective_fit_check():
    check_objective_fits("sft", {"a.jsonl": "openai"})
    check_objective_fits("dpo", {"a.jsonl": "preference"})
    with pytest.raises(BackpropError) as info:
        check_objective_fits("dpo", {"a.jsonl": "openai"})
    assert info.value.code == ErrorCode.DATASET_FORMAT_UNSUPPORTED
    assert "prompt, chosen, rejected" in info.value.message


def test_sft_rows_with_dpo_fail_before_the_model_loads(tmp_path, home, monkeypatch):
    import backpropagate.training.sft as engine

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine, "load_model", no_model)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4
    data = _write(tmp_path / "sft.jsonl", rows)
    config = RunConfig(model="demo", data=str(data), objective="dpo", eval_fraction=0.0, steps=2)
    with pytest.raises(BackpropError) as info:
        run_training(config, tmp_path / "run", lambda e: None)
    assert info.value.code == ErrorCode.DATASET_FORMAT_UNSUPPORTED


def test_dpo_on_full_fine_tuning_is_refused_before_the_model_loads(tmp_path, home, monkeypatch):
    import backpropagate.training.sft as engine

    monkeypatch.setattr(engine, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    data = _write(tmp_path / "pairs.jsonl", PAIRS)
    config = RunConfig(
        model="demo", data=str(data), objective="dpo", method="full", eval_fraction=0.0, steps=2
    )
    with pytest.raises(BackpropError) as info:
        run_training(config, tmp_path / "run", lambda e: None)
    assert info.value.code == ErrorCode.CONFIG_INVALID_SETTING
    assert "use method=lora" in info.value.message
