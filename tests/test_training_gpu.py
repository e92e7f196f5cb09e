"""GPU tier: the engine's CUDA paths (Unsloth, bf16/fp16, QLoRA, Liger, OOM recovery, auto batch).

Skipped without a CUDA GPU. On a GPU machine: ``pytest tests/test_training_gpu.py -q``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from backpropagate.config import RunConfig  # noqa: E402
from backpropagate.training import run_training  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory, home) -> Path:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    path = tmp_path_factory.mktemp("gpu") / "facts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} times two?"},
                      {"role": "assistant", "content": f"{i} times two is {2 * i}."}]}
        for i in range(16)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(data: Path, run_dir: Path, **overrides):
    fields = dict(
        model="demo", data=str(data), packing=True, max_seq_len=128, batch_size=4, grad_accum=1,
        lr=5e-3, lora_r=16, eval_fraction=0.0, steps=12, seed=0, lr_scheduler="constant",
    )  # fmt: skip
    fields.update(overrides)
    events: list = []
    result = run_training(RunConfig(**fields), run_dir, events.append)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return result, events, metrics


def started(events):
    return next(e for e in events if e.type == "run_started")


# First: Unsloth wants to be imported before transformers in the process.
def test_unsloth_backend(data, tmp_path, monkeypatch):
    pytest.importorskip("unsloth")
    monkeypatch.chdir(tmp_path)  # Unsloth writes a compile cache into the working directory
    result, events, metrics = run(data, tmp_path / "run", backend="unsloth", unsloth_fallback=False)
    assert started(events).backend == "unsloth" and metrics["precision"] == "bf16"
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def packed_vs_alone(model, attention: str | None, mask_dtype) -> float:
    """Largest |logit difference| between packed examples and the same examples run alone.

    ``attention=None`` feeds the packed row with neither mask nor position ids: the control,
    in which later examples see the earlier ones.
    """
    from backpropagate.data import collate, pack
    from backpropagate.training.evaluation import to_device

    rows = [
        {"input_ids": list(range(5 + n, 5 + 2 * n)), "labels": list(range(5 + n, 5 + 2 * n))}
        for n in (7, 4, 9)
    ]
    packed = pack(rows, 32)
    assert len(packed) == 1 and len(packed[0]["seq_lens"]) == 3
    # Width rounded up to 64 as the engine does on GPU: the padding must change nothing.
    batch = collate(packed, pad_id=0, attention=attention or "position_ids", pad_to_multiple=64)
    batch = to_device(batch, "cuda", mask_dtype)
    assert batch["input_ids"].shape[1] == 64
    if attention is None:
        batch = {"input_ids": batch["input_ids"]}
    batch.pop("labels", None)
    worst, start = 0.0, 0
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[0].float()
        for n in packed[0]["seq_lens"]:
            alone = model(input_ids=batch["input_ids"][:, start : start + n], use_cache=False).logits[0]
            worst = max(worst, (alone.float() - logits[start : start + n]).abs().max().item())
            start += n
    return worst


def test_packed_examples_stay_apart_with_unsloth(data):
    """The engine's Unsloth path feeds packed rows a 4D mask built from segment ids."""
    pytest.importorskip("unsloth")
    from backpropagate.training.backends import load_model

    config = RunConfig(model="demo", data=str(data), backend="unsloth", unsloth_fallback=False)
    loaded = load_model(config, lambda _e: None)
    assert loaded.backend == "unsloth"
    model = loaded.model.eval()
    masked = packed_vs_alone(model, "segments", loaded.dtype)
    leaky = packed_vs_alone(model, None, loaded.dtype)
    # bf16 rounding differs between the two shapes; leaking across examples is far larger.
    assert masked < 0.1 * leaky and masked < 0.25, (masked, leaky)


def test_transformers_bf16_lora_with_liger(data, tmp_path):
    result, events, metrics = run(data, tmp_path / "run", backend="transformers", use_liger="auto")
    assert started(events).backend == "transformers" and started(events).device.startswith("cuda")
    assert metrics["precision"] == "bf16" and metrics["peak_memory_mb"] > 0
    try:
        import liger_kernel  # noqa: F401

        assert metrics["liger"] is True
    except ImportError:
        assert metrics["liger"] is False
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 0.8


def test_fp16_with_grad_scaler(data, tmp_path):
    result, _, metrics = run(data, tmp_path / "run", backend="transformers", precision="fp16")
    assert metrics["precision"] == "fp16"
    assert all(h["loss"] == h["loss"] for h in result.history)  # no NaN
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_qlora(data, tmp_path):
    pytest.importorskip("bitsandbytes")
    result, _, metrics = run(data, tmp_path / "run", backend="transformers", method="qlora")
    assert result.status == "completed" and metrics["trainable_params"] < metrics["total_params"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_oom_recovery_on_gpu(data, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_FAULT_OOM_AT_STEP", "3")
    result, events, _ = run(data, tmp_path / "run", backend="transformers")
    ooms = [e for e in events if e.type == "oom_recovered"]
    assert [(o.old_micro_batch, o.new_micro_batch, o.grad_accum) for o in ooms] == [(4, 2, 2)]
    assert result.status == "completed"


def test_auto_batch_and_resume(data, tmp_path):
    result, _, metrics = run(data, tmp_path / "run", backend="transformers", batch_size="auto", save_every=5)
    assert metrics["micro_batch"] >= 1 and result.status == "completed"
    assert (tmp_path / "run" / "checkpoints" / "step-000010").is_dir()


def test_unsloth_failure_falls_back_once_or_refuses(data, tmp_path, monkeypatch):
    from backpropagate.errors import BackpropError, ErrorCode
    from backpropagate.training import backends

    def broken(*args, **kwargs):
        raise RuntimeError("simulated Unsloth failure")

    monkeypatch.setattr(backends, "_load_unsloth", broken)
    result, events, _ = run(data, tmp_path / "fallback", backend="unsloth", steps=2)
    warnings = [e for e in events if e.type == "warning" and "Unsloth" in e.message]
    assert len(warnings) == 1
    assert warnings[0].message == (
        "Unsloth load failed (RuntimeError: simulated Unsloth failure); falling back to transformers + PEFT"
    )
    assert started(events).backend == "transformers" and result.status == "completed"
    with pytest.raises(BackpropError) as info:
        run(data, tmp_path / "strict", backend="unsloth", unsloth_fallback=False, steps=2)
    assert info.value.code == ErrorCode.DEP_UNSLOTH_UNAVAILABLE


def test_full_fine_tuning_keeps_fp32_master_weights(data, tmp_path):
    from safetensors import safe_open

    result, _, metrics = run(data, tmp_path / "run", backend="transformers", method="full", lr=1e-4)
    assert metrics["precision"] == "bf16" and metrics["trainable_params"] == metrics["total_params"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    with safe_open(result.adapter_path / "model.safetensors", "pt") as fh:
        name = next(iter(fh.keys()))
        assert fh.get_tensor(name).dtype == torch.float32


@pytest.mark.parametrize("attention", ["4d", "segments", "position_ids"])
def test_packed_examples_stay_apart_on_gpu(data, attention):
    from transformers import AutoModelForCausalLM

    from backpropagate.models.demo import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("demo"), attn_implementation="sdpa")
    model = model.to("cuda").eval()
    diff = packed_vs_alone(model, attention, torch.float32)
    assert diff < 1e-4, (attention, diff, packed_vs_alone(model, None, torch.float32))


# FP8 LoRA (backpropagate/training/fp8.py): on cards with FP8 tensor cores only ----------------------
def _fp8_card() -> bool:
    return torch.cuda.get_device_capability(0) >= (8, 9)


@pytest.mark.skipif(not torch.cuda.is_available() or not _fp8_card(), reason="needs FP8 tensor cores (8.9+)")
def test_fp8_lora_trains_and_resumes_exactly(data, tmp_path):
    from safetensors.torch import load_file

    from backpropagate.training.control import RunControl

    fields = dict(fp8=True, backend="transformers", steps=12, save_every=3, lr_scheduler="cosine")
    result, events, metrics = run(data, tmp_path / "whole", **fields)
    assert started(events).backend == "transformers" and metrics["precision"] == "bf16"
    assert all(h["loss"] == h["loss"] for h in result.history)  # no NaN
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 0.8

    control = RunControl()

    def stop_at_6(event):
        if event.type == "step" and event.step == 6:
            control.request_stop("user")

    fields_all = dict(
        model="demo", data=str(data), packing=True, max_seq_len=128, batch_size=4, grad_accum=1,
        lr=5e-3, lora_r=16, eval_fraction=0.0, seed=0, **fields,
    )  # fmt: skip
    config = RunConfig(**fields_all)
    stopped = run_training(config, tmp_path / "resumed", stop_at_6, control)
    assert stopped.status == "cancelled" and stopped.step == 6
    resumed = run_training(config, tmp_path / "resumed", lambda _e: None)
    assert resumed.resumed_from_step == 6
    want = [h["loss"] for h in result.history if h["step"] > 6]
    got = [h["loss"] for h in resumed.history if h["step"] > 6]
    # As close as the group test's GPU resume (SDPA's backward may reorder sums); the device check
    # (bench/fp8_check.py) reports whether it is bitwise.
    assert got == pytest.approx(want, rel=2e-3)
    mine = load_file(resumed.adapter_path / "adapter_model.safetensors")
    theirs = load_file(result.adapter_path / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype != torch.float8_e4m3fn
        assert torch.allclose(mine[key].float(), theirs[key].float(), rtol=1e-2, atol=1e-4), key


@pytest.mark.skipif(not torch.cuda.is_available() or not _fp8_card(), reason="needs FP8 tensor cores (8.9+)")
def test_fp8_layer_matches_its_emulation_and_bf16_on_gpu():
    from backpropagate.training import fp8

    torch.manual_seed(0)
    linear = torch.nn.Linear(896, 4864, bias=True, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = fp8.Fp8Linear(linear)
    x = torch.randn(3, 700, 896, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    ref_y = x.detach().float() @ linear.weight.float().t() + linear.bias.float()
    ref_dx = g.float() @ linear.weight.float()

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert rel(y, ref_y) < 5e-2 and rel(x.grad, ref_dx) < 5e-2
    layer.emulate = True
    xe = x.detach().requires_grad_(True)
    ye = layer(xe)
    ye.backward(g)
    assert rel(y, ye.float()) < 1e-2 and rel(x.grad, xe.grad.float()) < 1e-2
