"""Preference objectives through the real training loop on the tiny demo model.

Learning (margin and accuracy rise; KTO's loss falls), the per-sequence log-probs against the
model's own cross-entropy, the reference being the base model, evaluation, OOM recovery at the
same step, a full fine-tune with a reference-free objective, and KTO rows found and trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.training import run_training

pytestmark = pytest.mark.slow

# Chosen and rejected are the same length and differ in one number: an untrained model has no
# preference between them, so accuracy starts near chance and must be learned.
PAIRS = [
    {"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}.", "rejected": f"It is {a + b + 1}."}
    for a in range(4)
    for b in range(4)
]
# KTO rates each completion alone: on near-identical answers the unwanted one pulls the shared
# tokens down for both (measured: loss stays at 0.5), so its test uses answers that differ.
RATED = [
    {
        "prompt": f"What is {a} plus {b}?",
        "chosen": f"It is {a + b}.",
        "rejected": f"No idea, maybe {a * b + 7}?",
    }
    for a in range(4)
    for b in range(4)
]
STEPS = 40


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, home) -> Path:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return path


def pref_config(data: Path, objective: str, **overrides) -> RunConfig:
    fields = dict(
        model="demo", data=str(data), objective=objective, max_seq_len=64, batch_size=4, grad_accum=1,
        lr=2e-3, lora_r=16, lora_alpha=32, eval_fraction=0.0, lr_scheduler="constant", warmup_ratio=0.0,
        steps=STEPS, seed=0, save_every=1000, log_every=1,
    )  # fmt: skip
    fields.update(overrides)
    return RunConfig(**fields)


def steps_of(events: list) -> list:
    return [e for e in events if e.type == "step"]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ORPO's reward is lambda x the mean log-prob: at the paper's 0.1 the odds-ratio term is a small
# nudge beside SFT on `chosen`; at 1.0 the preference shows within 40 steps.
@pytest.mark.parametrize(("objective", "knobs"), [("dpo", {}), ("orpo", {"orpo_lambda": 1.0}), ("simpo", {})])
def test_reward_margin_and_accuracy_rise(pairs_file, tmp_path, objective, knobs):
    events: list = []
    config = pref_config(pairs_file, objective, lr=5e-3, **knobs)
    result = run_training(config, tmp_path / "run", events.append)
    assert result.status == "completed" and result.step == STEPS
    steps = steps_of(events)
    assert len(steps) == STEPS
    margins = [s.reward_margin for s in steps]
    accuracy = [s.reward_accuracy for s in steps]
    assert all(m is not None for m in margins) and all(0 <= a <= 1 for a in accuracy)
    # Measured on this data (first 10 steps -> last 10): accuracy 0.30 -> 0.85 (DPO),
    # 0.47 -> 0.72 (ORPO), 0.42 -> 0.90 (SimPO); every margin from about 0 to clearly positive.
    assert mean(margins[-10:]) > max(0.03, mean(margins[:10])), margins
    assert mean(accuracy[-10:]) >= mean(accuracy[:10]) + 0.15, accuracy
    # The step's numbers are what the checkpoint history keeps, so a resumed run carries them too.
    assert result.history[-1]["reward_margin"] == pytest.approx(steps[-1].reward_margin)
    # The trained adapter is a normal LoRA adapter, exportable like any SFT one.
    assert (result.adapter_path / "adapter_model.safetensors").exists()


def test_kto_loss_falls_on_pairs_split_into_rows(tmp_path, home):
    data = tmp_path / "rated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RATED))
    events: list = []
    result = run_training(pref_config(data, "kto", lr=5e-3), tmp_path / "run", events.append)
    steps = steps_of(events)
    losses = [s.loss for s in steps]
    assert result.status == "completed"
    assert mean(losses[-5:]) < 0.5 * mean(losses[:5]), losses
    assert all(s.kl is not None and s.kl >= 0 for s in steps)
    # Desirable completions gain reward, undesirable ones lose it.
    assert steps[-1].chosen_reward > 0 > steps[-1].rejected_reward


def test_kto_rows_are_detected_and_trained(tmp_path, home):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in PAIRS[:6]]
    rows += [{"prompt": p["prompt"], "completion": p["rejected"], "label": "false"} for p in PAIRS[6:12]]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    events: list = []
    result = run_training(pref_config(data, "kto", steps=3), tmp_path / "run", events.append)
    assert result.status == "completed"
    # SFT on the same rows would learn the unwanted completions: refused before a model loads.
    with pytest.raises(BackpropError) as info:
        run_training(pref_config(data, "sft", steps=1), tmp_path / "sft", lambda e: None)
    assert info.value.code == ErrorCode.DATASET_FORMAT_UNSUPPORTED
    assert "objective=kto" in info.value.hint


def test_eval_reports_the_objective_loss_and_accuracy(pairs_file, tmp_path):
    import math

    events: list = []
    # Evaluated on the training pairs themselves: after training the model must prefer them.
    config = pref_config(pairs_file, "dpo", steps=20, lr=5e-3, eval_data=str(pairs_file), eval_every=10)
    run_training(config, tmp_path / "run", events.append)
    evals = [e for e in events if e.type == "eval"]
    assert [e.step for e in evals] == [10, 20]
    assert all(e.perplexity is None and 0 <= e.reward_accuracy <= 1 for e in evals)
    assert evals[-1].loss < math.log(2)  # the loss of a model with no preference
    assert evals[-1].reward_margin > 0


def test_oom_recovery_redoes_the_dpo_step_with_the_same_pairs(pairs_file, tmp_path, monkeypatch):
    config = pref_config(pairs_file, "dpo", steps=4, batch_size=4, grad_accum=2, lora_dropout=0.0)
    clean = run_training(config, tmp_path / "clean", lambda e: None)
    monkeypatch.setenv("BACKPROPAGATE_FAULT_OOM_AT_STEP", "2")
    events: list = []
    recovered = run_training(config, tmp_path / "oom", events.append)
    ooms = [e for e in events if e.type == "oom_recovered"]
    assert [(o.step, o.old_micro_batch, o.new_micro_batch, o.grad_accum) for o in ooms] == [(2, 4, 2, 4)]
    assert recovered.status == "completed"
    # Same pairs in the step, split finer: the curve is the clean run's up to float summation order.
    got = [h["loss"] for h in recovered.history]
    want = [h["loss"] for h in clean.history]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_orpo_runs_on_full_fine_tuning(pairs_file, tmp_path):
    result = run_training(
        pref_config(pairs_file, "orpo", method="full", steps=2, lr=1e-4), tmp_path / "r", lambda e: None
    )
    assert result.status == "completed"
    assert (result.adapter_path / "config.json").exists()  # a whole model, not an adapter


def test_sequence_logps_match_the_models_own_cross_entropy(pairs_file, home):
    """The summed response log-prob equals -(HF's mean token loss x response tokens) per row."""
    import torch
    from transformers import AutoModelForCausalLM

    from backpropagate.data import collate
    from backpropagate.data.preference import tokenize_pair
    from backpropagate.models.demo import resolve_model
    from backpropagate.training.backends import load_tokenizer
    from backpropagate.training.preference_step import sequence_logps

    path = resolve_model("demo")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = [tokenize_pair(p, tokenizer, 64) for p in PAIRS[:3]]
    seqs = [{"input_ids": r["chosen_input_ids"], "labels": r["chosen_labels"]} for r in rows]
    batch = collate(seqs, pad_id=tokenizer.pad_token_id or 0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp, n = sequence_logps(logits, batch["labels"])
        for i, seq in enumerate(seqs):
            one = model(input_ids=torch.tensor([seq["input_ids"]]), labels=torch.tensor([seq["labels"]]))
            assert float(logp[i]) == pytest.approx(-float(one.loss) * int(n[i]), rel=1e-4)


def test_reference_is_the_base_model_with_the_adapter_off(pairs_file, home):
    """At step 0 a LoRA adapter (B = 0) changes nothing, so DPO's policy and reference agree:
    the loss is exactly log 2 and every reward is zero."""
    import math

    from backpropagate.data import collate
    from backpropagate.data.preference import tokenize_pair
    from backpropagate.training.backends import load_model, load_tokenizer, resolve_model_path
    from backpropagate.training.preference_step import PreferenceLoss

    config = pref_config(pairs_file, "dpo")
    tokenizer = load_tokenizer(resolve_model_path("demo"))
    loaded = load_model(config, lambda e: None, tokenizer=tokenizer)
    rows = [tokenize_pair(p, tokenizer, 64) for p in PAIRS[:4]]
    loss = PreferenceLoss(config, lambda chunk: collate(chunk, pad_id=0), loaded.device)
    out = loss(loaded.model, rows)
    assert float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-5)
    assert out.metrics["reward_margin"] == pytest.approx(0.0, abs=1e-5)


@pytest.fixture(scope="module")
def trl_dpo(home, tmp_path_factory):
    """TRL's DPOTrainer on the demo model with a fresh LoRA adapter, then the adapter's B moved
    away from zero so that policy and reference differ; one of its padded batches."""
    import torch

    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backpropagate.models.demo import resolve_model
    from backpropagate.training.backends import load_tokenizer

    path = resolve_model("demo")
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora)
    pairs = [
        {
            "prompt": f"What is {a} plus {b}?",
            "chosen": f"It is {a + b}.",
            "rejected": f"Maybe {a + b + 1}, not sure.",
        }
        for a, b in [(0, 1), (2, 2), (3, 1), (1, 1)]
    ]
    args = trl.DPOConfig(
        str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4, beta=0.1, report_to=[],
        use_cpu=True, max_length=64, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = trl.DPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer
    )
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name and ".default." in name:
                param.normal_(0, 0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch, tokenizer


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_on_a_model_equals_trls(trl_dpo, loss_type):
    """TRL as an outside oracle: its DPOTrainer's loss on its own padded batch, and ours on the
    same token ids and response masks, through the same model (reference: the adapter off)."""
    import torch

    from backpropagate.data import collate
    from backpropagate.training.preference_step import PreferenceLoss

    trainer, batch, tokenizer = trl_dpo
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.model.train()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, batch, False)

    n = batch["input_ids"].shape[0] // 2  # TRL's batch is [chosen..., rejected...]

    def side(i: int) -> tuple[list[int], list[int]]:
        keep = batch["attention_mask"][i].bool()
        labels = batch["input_ids"][i].masked_fill(batch["completion_mask"][i] == 0, -100)
        return batch["input_ids"][i][keep].tolist(), labels[keep].tolist()

    rows = []
    for i in range(n):
        (ci, cl), (ri, rl) = side(i), side(n + i)
        rows.append(
            {"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl}
        )
    assert any(
        len(r["chosen_input_ids"]) != len(r["rejected_input_ids"]) for r in rows
    )  # padding is exercised
    config = RunConfig(data="pairs.jsonl", objective="dpo", beta=0.1, dpo_loss_type=loss_type)
    loss = PreferenceLoss(config, lambda chunk: collate(chunk, pad_id=tokenizer.pad_token_id or 0), "cpu")
    with torch.no_grad():
        ours = loss(trainer.model, rows)
    assert float(ours.loss) == pytest.approx(float(theirs), rel=1e-5)
    if loss_type == "sigmoid":  # policy and reference really differ: not the no-preference value log 2
        assert abs(float(ours.loss) - 0.693147) > 1e-3


def test_trainer_takes_rows_in_memory_and_keeps_them_with_the_run(home):
    from backpropagate import Trainer
    from backpropagate.settings import get_settings

    runs = get_settings().runs_dir
    before = set(runs.iterdir()) if runs.exists() else set()
    result = Trainer("demo", objective="dpo", beta=0.1, max_seq_len=64, eval_fraction=0.0).train(
        PAIRS[:4], steps=2
    )
    assert result.status == "completed"
    kept = result.run_dir / "data.jsonl"
    assert [json.loads(line) for line in kept.read_text().splitlines()] == PAIRS[:4]
    assert json.loads((result.run_dir / "config.json").read_text())["data"] == str(kept)

    with pytest.raises(BackpropError) as info:
        Trainer("demo", objective="dpo").train(["not a row"], steps=1)  # type: ignore[list-item]
    assert info.value.code == ErrorCode.CONFIG_INVALID
    assert set(runs.iterdir()) - before == {result.run_dir}  # the refused call left no run behind


def test_lean_log_probs_equal_the_full_logits_path_in_value_and_gradient(pairs_file, home, monkeypatch):
    """The LM head on response positions only, in checkpointed chunks, is the same function."""
    import torch

    import backpropagate.training.preference_step as step
    from backpropagate.data import collate
    from backpropagate.data.preference import tokenize_pair
    from backpropagate.training.backends import load_model, load_tokenizer, resolve_model_path

    monkeypatch.setattr(step, "HEAD_CHUNK", 7)  # several chunks, the last one partial
    config = pref_config(pairs_file, "dpo", lora_dropout=0.0)
    tokenizer = load_tokenizer(resolve_model_path("demo"))
    model = load_model(config, lambda e: None, tokenizer=tokenizer).model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    rows = [tokenize_pair(p, tokenizer, 64) for p in PAIRS[:3]]
    seqs = step._sequences(rows, pairwise=True)
    batch = collate(seqs, pad_id=tokenizer.pad_token_id or 0)
    labels = batch.pop("labels")
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run(fn):
        model.zero_grad(set_to_none=True)
        logp, n = fn()
        (logp * torch.linspace(1, 2, len(logp))).sum().backward()
        return logp.detach(), n, [p.grad.clone() for p in trainable]

    lean = run(lambda: step.response_logps(model, batch, labels))
    full = run(lambda: step.sequence_logps(model(**batch, use_cache=False).logits, labels))
    assert torch.allclose(lean[0], full[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(lean[1], full[1])
    for a, b in zip(lean[2], full[2], strict=True):  # float32 sums in another order: ~1e-7 apart
        assert float((a - b).norm() / b.norm()) < 1e-5
