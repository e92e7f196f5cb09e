"""The SFT engine in-process on the tiny demo model: learning, OOM recovery, eval failures, stop, qlora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.training import run_training
from backpropagate.training.control import RunControl

pytestmark = pytest.mark.slow

FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cats say?", "Cats say meow."),
    ("How many legs has a dog?", "A dog has four legs."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
    ("When do we sleep?", "We sleep at night."),
    ("What grows on trees?", "Leaves grow on trees."),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The machines that run the suite are shared; one thread per process avoids oversubscription.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory, home) -> Path:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")  # built once per test session, shared by every test here
    path = tmp_path_factory.mktemp("data") / "facts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small(data: Path, **overrides) -> RunConfig:
    fields = dict(
        model="demo", data=str(data), packing=False, max_seq_len=64, batch_size=4, grad_accum=2,
        lr=5e-3, lora_r=16, lora_alpha=32, eval_fraction=0.0, warmup_ratio=0.1, lr_scheduler="constant",
        steps=4, seed=0, save_every=1000,
    )  # fmt: skip
    fields.update(overrides)
    return RunConfig(**fields)


class Recorder(list):
    def __call__(self, event):
        self.append(event)

    def of(self, kind: str) -> list:
        return [e for e in self if e.type == kind]


def test_loss_on_memorization_set_falls_by_half(facts_file, tmp_path):
    events = Recorder()
    result = run_training(small(facts_file, steps=30), tmp_path / "run", events)

    losses = [h["loss"] for h in result.history]
    assert result.status == "completed" and len(losses) == 30
    assert losses[-1] <= losses[0] / 2, losses
    # Events tell the whole story, in order.
    kinds = [e.type for e in events]
    assert kinds.index("run_started") < kinds.index("step") < kinds.index("completed") == len(kinds) - 1
    started = events.of("run_started")[0]
    assert started.backend == "transformers" and started.device == "cpu" and started.total_steps == 30
    assert not events.of("warning")  # on CPU the Unsloth fallback is quiet
    steps = events.of("step")
    assert [s.step for s in steps] == list(range(1, 31))
    assert all(s.micro_batch == 4 and s.grad_accum == 2 and s.tokens_per_s > 0 for s in steps)
    # The adapter is a PEFT folder with the tokenizer, and metrics.json agrees with the result.
    assert (result.adapter_path / "adapter_config.json").is_file()
    assert (result.adapter_path / "tokenizer.json").is_file()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["final_loss"] == pytest.approx(losses[-1])
    assert events.of("completed")[0].adapter_path == str(result.adapter_path)


def test_oom_recovery_keeps_the_effective_batch(facts_file, tmp_path, monkeypatch):
    reference = run_training(small(facts_file), tmp_path / "reference", Recorder())

    monkeypatch.setenv("BACKPROPAGATE_FAULT_OOM_AT_STEP", "2")
    monkeypatch.setenv("BACKPROPAGATE_FAULT_OOM_TIMES", "2")
    events = Recorder()
    result = run_training(small(facts_file), tmp_path / "oom", events)

    assert result.status == "completed" and result.step == 4
    ooms = events.of("oom_recovered")
    assert [(o.step, o.old_micro_batch, o.new_micro_batch, o.grad_accum) for o in ooms] == [
        (2, 4, 2, 4),
        (2, 2, 1, 8),
    ]
    for step in events.of("step"):
        assert step.micro_batch * step.grad_accum == 8  # same effective batch before and after
    # The step was redone from its start with the same examples: the run is the same run.
    got = [h["loss"] for h in result.history]
    want = [h["loss"] for h in reference.history]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_oom_without_recovery_fails_at_once(facts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_FAULT_OOM_AT_STEP", "1")
    events = Recorder()
    with pytest.raises(BackpropError) as info:
        run_training(small(facts_file, oom_recovery=False), tmp_path / "run", events)
    assert info.value.code == ErrorCode.RUNTIME_GPU_OOM
    assert not events.of("oom_recovered")


def test_oom_at_micro_batch_one_gives_up_after_three_retries(facts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_FAULT_OOM_AT_STEP", "1")
    monkeypatch.setenv("BACKPROPAGATE_FAULT_OOM_TIMES", "10")
    events = Recorder()
    with pytest.raises(BackpropError) as info:
        run_training(small(facts_file, batch_size=2, grad_accum=1), tmp_path / "run", events)
    assert info.value.code == ErrorCode.RUNTIME_OOM_RECOVERY_EXHAUSTED
    ooms = events.of("oom_recovered")
    assert [(o.old_micro_batch, o.new_micro_batch, o.retries) for o in ooms] == [
        (2, 1, 0),
        (1, 1, 1),
        (1, 1, 2),
        (1, 1, 3),
    ]


def test_failed_eval_leaves_training_going(facts_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("BACKPROPAGATE_FAULT_EVAL_AT_STEP", "2")
    events = Recorder()
    config = small(facts_file, steps=4, eval_every=2, save_every=2, eval_fraction=0.25, lora_dropout=0.1)
    result = run_training(config, tmp_path / "run", events)

    assert result.status == "completed"
    warnings = events.of("warning")
    assert len(warnings) == 1 and "Evaluation at step 2 failed" in warnings[0].message
    assert [e.step for e in events.of("eval")] == [4]  # the final evaluation ran
    # Steps after the failed evaluation still changed the weights.
    at_2 = load_file(tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.safetensors")
    final = load_file(result.adapter_path / "adapter_model.safetensors")
    lora_b = [k for k in at_2 if "lora_B" in k][0]
    saved_key = lora_b.replace(".default", "")
    assert saved_key in final
    assert not (at_2[lora_b] == final[saved_key]).all()


def test_evaluate_puts_the_model_back_in_train_mode_when_it_raises(facts_file):
    from backpropagate.training.backends import load_model
    from backpropagate.training.evaluation import evaluate

    loaded = load_model(small(facts_file), emit=lambda e: None)
    model = loaded.model
    model.train()

    def broken_collate(rows):
        assert not model.training  # evaluation really runs in eval mode
        raise ValueError("bad batch")

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    with pytest.raises(ValueError, match="bad batch"):
        evaluate(model, rows, broken_collate, batch_size=1, device=loaded.device)
    assert model.training
    assert all(m.training for m in model.modules())


def test_stop_request_checkpoints_and_reports_cancelled(facts_file, tmp_path):
    control = RunControl()
    events = Recorder()

    def emit(event):
        events(event)
        if event.type == "step" and event.step == 2:
            control.request_stop("user")

    result = run_training(small(facts_file, steps=6), tmp_path / "run", emit, control)

    assert result.status == "cancelled" and result.step == 2
    cancelled = events.of("cancelled")
    assert len(cancelled) == 1 and cancelled[0].step == 2
    assert Path(cancelled[0].checkpoint) == tmp_path / "run" / "checkpoints" / "step-000002"
    assert events.of("checkpoint")[-1].step == 2
    assert not events.of("completed") and not (tmp_path / "run" / "adapter").exists()
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == [2]

    # Running the same run folder again resumes at step 3 and finishes.
    again = Recorder()
    done = run_training(small(facts_file, steps=6), tmp_path / "run", again)
    assert done.status == "completed" and done.resumed_from_step == 2
    assert [e.step for e in again.of("step")] == [3, 4, 5, 6]
    assert [h["step"] for h in done.history] == [1, 2, 3, 4, 5, 6]


def test_qlora_on_cpu_is_an_invalid_setting_before_loading(facts_file, tmp_path):
    events = Recorder()
    with pytest.raises(BackpropError) as info:
        run_training(small(facts_file, method="qlora"), tmp_path / "run", events)
    assert info.value.code == ErrorCode.CONFIG_INVALID_SETTING
    assert "CUDA GPU" in info.value.message
    assert not events  # refused before any loading


def test_unsloth_without_fallback_on_cpu_is_refused(facts_file, tmp_path):
    with pytest.raises(BackpropError) as info:
        run_training(
            small(facts_file, backend="unsloth", unsloth_fallback=False), tmp_path / "run", Recorder()
        )
    assert info.value.code == ErrorCode.DEP_UNSLOTH_UNAVAILABLE


def test_full_fine_tuning_and_epochs(facts_file, tmp_path):
    # One epoch of 8 rows at an effective batch of 3 is three steps: 3 + 3 + 2 rows.
    config = small(facts_file, method="full", steps=None, epochs=1, batch_size=3, grad_accum=1, lr=1e-4)
    result = run_training(config, tmp_path / "run", Recorder())
    assert result.step == 3 and result.history[-1]["epoch"] == 1.0
    assert (result.adapter_path / "model.safetensors").is_file()


def test_lora_options_reach_the_adapter(facts_file, tmp_path):
    config = small(
        facts_file, steps=2, use_dora=True, use_rslora=True, target_modules=["q_proj", "v_proj"],
        lora_r=4, lora_alpha=8, gradient_checkpointing=True,
    )  # fmt: skip
    result = run_training(config, tmp_path / "run", Recorder())
    saved = json.loads((result.adapter_path / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["use_rslora"] and saved["r"] == 4 and saved["lora_alpha"] == 8
    assert set(saved["target_modules"]) == {"q_proj", "v_proj"}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["gradient_checkpointing"] is True and metrics["liger"] is False
    assert all(h["grad_norm"] > 0 for h in result.history)
