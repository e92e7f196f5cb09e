"""Engine parts without a model: checkpoint files and pruning, data order, load errors, run ids, faults."""

from __future__ import annotations

import json
import random

import pytest

from backpropagate.config import RunConfig
from backpropagate.errors import ErrorCode
from backpropagate.training import checkpoints as ckpt
from backpropagate.training.backends import model_load_error, pick_device, pick_precision
from backpropagate.training.data_order import DataOrder, DataPosition, label_tokens
from backpropagate.training.faults import FaultInjector
from backpropagate.training.optim import total_steps
from backpropagate.training.run_ids import is_run_id, new_run_id


@pytest.fixture
def tiny_parts():
    import torch
    from transformers import get_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen weights stay out of checkpoints
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=10)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def save(root, step, parts, eval_loss=None, keep=2):
    model, opt, sched = parts
    return ckpt.save_checkpoint(
        root, step=step, model=model, optimizer=opt, scheduler=sched,
        state={"step": step, "epoch": 0, "index": step}, eval_loss=eval_loss, keep=keep,
    )  # fmt: skip


def test_checkpoint_round_trip_and_manifest(tmp_path, tiny_parts):
    import numpy as np
    import torch

    model, _, _ = tiny_parts
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    saved = save(tmp_path, 7, tiny_parts, eval_loss=1.5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())

    assert saved.path == tmp_path / "step-000007" and saved.best and saved.bytes > 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["checkpoints"][0]
    assert entry["step"] == 7 and entry["eval_loss"] == 1.5
    assert entry["files"]["trainable.safetensors"]["sha256"] == ckpt.sha256_file(
        saved.path / "trainable.safetensors"
    )
    loaded, skipped = ckpt.load_latest_checkpoint(tmp_path)
    assert not skipped and loaded.state["step"] == 7 and loaded.state["index"] == 7
    assert set(loaded.weights) == {"0.bias", "1.weight", "1.bias"}  # the frozen weight is not saved
    assert torch.equal(loaded.weights["1.weight"], model[1].weight.detach())
    ckpt.restore_rng(loaded.rng)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_pruning_keeps_the_last_n_and_the_best(tmp_path, tiny_parts):
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: None}
    for step, loss in losses.items():
        save(tmp_path, step, tiny_parts, eval_loss=loss, keep=2)
    kept = sorted(p.name for p in tmp_path.glob("step-*"))
    assert kept == ["step-000002", "step-000004", "step-000005"]  # last two + best (step 2)
    manifest = ckpt.read_manifest(tmp_path)
    assert [c["step"] for c in manifest["checkpoints"]] == [2, 4, 5]


def test_truncated_or_unfinished_checkpoints_are_skipped(tmp_path, tiny_parts):
    save(tmp_path, 1, tiny_parts, keep=5)
    save(tmp_path, 2, tiny_parts, keep=5)
    save(tmp_path, 3, tiny_parts, keep=5)
    (tmp_path / "step-000003" / "optimizer.pt").write_bytes(b"short")
    (tmp_path / "step-000002" / "meta.json").unlink()
    loaded, skipped = ckpt.load_latest_checkpoint(tmp_path)
    assert loaded.state["step"] == 1
    assert [e.code for e in skipped] == [ErrorCode.STATE_CHECKPOINT_INVALID] * 2
    assert "optimizer.pt has 5 bytes" in skipped[0].message
    assert "meta.json is missing" in skipped[1].message


def test_data_order_is_a_resumable_position():
    order = DataOrder(5, seed=1)
    first, pos = order.take(DataPosition(), 3)
    second, pos = order.take(pos, 4)  # runs into the second epoch
    assert sorted(first + second[:2]) == [0, 1, 2, 3, 4]
    assert pos == DataPosition(1, 2) and order.epoch_progress(pos) == pytest.approx(1.4)
    # A fresh order object at the stored position continues identically.
    again, _ = DataOrder(5, seed=1).take(DataPosition(1, 0), 2)
    assert again == second[2:]


def test_label_tokens_counts_after_the_shift():
    assert label_tokens({"input_ids": [1, 2, 3, 4], "labels": [5, -100, 3, 4]}) == 2


def test_total_steps_from_steps_or_epochs():
    cfg = RunConfig(data="x", steps=None, epochs=2)
    assert total_steps(cfg, n_train=10, effective_batch=8) == 3
    assert total_steps(RunConfig(data="x", steps=5), n_train=10, effective_batch=8) == 5


def test_load_errors_name_cause_and_fix():
    import httpx
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    def response(status):
        return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))

    def wrapped(inner):
        try:
            try:
                raise inner
            except Exception as exc:
                raise OSError("transformers could not load it") from exc
        except OSError as outer:
            return outer

    gated = model_load_error(
        "meta-llama/Llama-3.1-8B", wrapped(GatedRepoError("401 Client Error", response=response(401)))
    )
    assert gated.code == ErrorCode.DEP_MODEL_LOAD_FAILED and "gated" in gated.message
    assert "huggingface-cli login" in gated.hint
    missing = model_load_error(
        "nobody/nothing", wrapped(RepositoryNotFoundError("404 Client Error", response=response(404)))
    )
    assert "not found" in missing.message and "spelling" in missing.hint
    offline = model_load_error("org/model", wrapped(LocalEntryNotFoundError("no connection")))
    assert "offline" in offline.message and "HF_HUB_OFFLINE" in offline.hint
    folder = model_load_error("./no/such/folder", OSError("no config.json"))
    assert "not a model folder" in folder.message


def test_real_offline_hub_id_maps_to_offline(monkeypatch):
    from transformers import AutoConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as info:
        AutoConfig.from_pretrained("no-such-org/no-such-model-xyz")
    err = model_load_error("no-such-org/no-such-model-xyz", info.value)
    assert err.code == ErrorCode.DEP_MODEL_LOAD_FAILED and "offline" in err.message


def test_cpu_precision_rules():
    cpu = pick_device(RunConfig(data="x", device="cpu"))
    assert pick_precision(RunConfig(data="x"), cpu)[0] == "fp32"
    with pytest.raises(Exception) as info:
        pick_precision(RunConfig(data="x", precision="fp16"), cpu)
    assert info.value.code == ErrorCode.CONFIG_INVALID_SETTING


def test_run_ids_sort_by_time_and_are_unique():
    a, b = new_run_id(1_700_000_000), new_run_id(1_700_000_001)
    assert is_run_id(a) and a.startswith("20231114-221320-") and a < b
    assert len({new_run_id() for _ in range(50)}) > 40
    assert not is_run_id("../etc")


def test_fault_injector_fires_the_number_of_times_asked():
    import torch

    faults = FaultInjector({"BACKPROPAGATE_FAULT_OOM_AT_STEP": "3", "BACKPROPAGATE_FAULT_OOM_TIMES": "2"})
    faults.maybe_oom(2)
    for _ in range(2):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            faults.maybe_oom(3)
    faults.maybe_oom(3)  # spent
    FaultInjector({}).maybe_oom(3)


def test_weights_of_another_shape_are_refused(tiny_parts):
    import torch

    from backpropagate.errors import BackpropError

    model, _, _ = tiny_parts
    with pytest.raises(BackpropError) as info:
        ckpt.apply_weights(model, {"1.weight": torch.zeros(3, 4)})
    assert info.value.code == ErrorCode.STATE_CHECKPOINT_INVALID and "1.weight" in info.value.message
    ckpt.apply_weights(model, {"1.bias": torch.ones(2)})
    assert torch.equal(model[1].bias.detach(), torch.ones(2))


def test_adapters_stay_in_the_compute_dtype_only_for_bf16_lora_on_gpu():
    import torch

    from backpropagate.config import RunConfig
    from backpropagate.training.backends import adapters_in_compute_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    lora = RunConfig(data="x")
    assert adapters_in_compute_dtype(lora, cuda, "bf16")
    assert not adapters_in_compute_dtype(lora, cuda, "fp16")  # the gradient scaler needs fp32
    assert not adapters_in_compute_dtype(lora, cpu, "fp32")
    assert not adapters_in_compute_dtype(RunConfig(data="x", adapter_dtype="fp32"), cuda, "bf16")
    assert not adapters_in_compute_dtype(RunConfig(data="x", method="full"), cuda, "bf16")
    assert not adapters_in_compute_dtype(RunConfig(data="x", method="qlora"), cuda, "bf16")
