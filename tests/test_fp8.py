"""FP8 LoRA on the CPU: the refusals, the path chosen, and the emulated FP8 layer's numerics and layout.

The ``_scaled_mm`` kernels themselves run on the device (tests/test_training_gpu.py, bench/fp8_check.py);
here the same quantization is emulated in fp32, which is also what those compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from backpropagate.config import RunConfig  # noqa: E402
from backpropagate.errors import BackpropError, ErrorCode  # noqa: E402
from backpropagate.training import fp8  # noqa: E402
from backpropagate.training.backends import check_machine, load_model  # noqa: E402


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def data(tmp_path_factory, home) -> Path:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    path = tmp_path_factory.mktemp("fp8") / "facts.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} times two?"},
                      {"role": "assistant", "content": f"{i} times two is {2 * i}."}]}
        for i in range(12)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(data: Path, **overrides) -> RunConfig:
    fields = dict(
        model="demo", data=str(data), fp8=True, packing=True, max_seq_len=64, batch_size=2, grad_accum=1,
        lr=5e-3, lora_r=8, eval_fraction=0.0, steps=4, seed=0, lr_scheduler="constant", save_every=2,
    )  # fmt: skip
    fields.update(overrides)
    return RunConfig(**fields)


@pytest.fixture
def fp8_card(monkeypatch):
    """A pretend CUDA card of the given compute capability for the machine checks."""

    def card(capability: tuple[int, int], name: str = "NVIDIA H200"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return torch.device("cuda", 0)

    return card


# Refusals -----------------------------------------------------------------------------------------
def test_cpu_is_refused_before_any_model_loads(data, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from backpropagate.training import run_training

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    events: list = []
    with pytest.raises(BackpropError) as info:
        run_training(config(data), tmp_path / "run", events.append)
    assert info.value.code == ErrorCode.RUNTIME_FP8_UNSUPPORTED
    assert "this run is on cpu" in info.value.message
    assert not [e for e in events if e.type == "status"]  # not even "loading_model"


def test_a_card_without_fp8_is_named(data, fp8_card):
    device = fp8_card((8, 6), "NVIDIA GeForce RTX 3090")
    with pytest.raises(BackpropError) as info:
        check_machine(config(data), device)
    assert info.value.code == ErrorCode.RUNTIME_FP8_UNSUPPORTED
    assert "NVIDIA GeForce RTX 3090 is 8.6" in info.value.message and "8.9" in info.value.message


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"method": "full"}, "torchao"),
        ({"method": "qlora"}, "method='qlora'"),
        ({"precision": "fp16"}, "precision='bf16'"),
        ({"use_dora": True}, "DoRA"),
        ({"backend": "unsloth", "unsloth_fallback": False}, "unsloth_fallback=False"),
    ],
)
def test_settings_fp8_does_not_go_with_are_refused(data, fp8_card, overrides, words):
    device = fp8_card((9, 0))
    with pytest.raises(BackpropError) as info:
        fp8.check_supported(config(data, **overrides), device)
    assert info.value.code == ErrorCode.CONFIG_INVALID_SETTING and words in info.value.message


def test_fp8_cards_and_fp8_off_pass(data, fp8_card):
    for capability in [(8, 9), (9, 0), (10, 0)]:
        fp8.check_supported(config(data), fp8_card(capability))
    fp8.check_supported(config(data, fp8=False), torch.device("cpu"))
    check_machine(config(data, fp8=False), torch.device("cpu"))


def test_cli_has_the_flag():
    from backpropagate.cli.train import build_config

    assert build_config({"data": "x.jsonl", "fp8": True}).fp8 is True
    assert RunConfig(data="x.jsonl").fp8 is False


# Path selection ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "warned"), [("unsloth", True), ("auto", False), ("transformers", False)])
def test_fp8_takes_the_transformers_path(data, monkeypatch, backend, warned):
    """On an FP8 card (pretended: the machine check passes) Unsloth is never loaded for fp8=True."""
    from backpropagate.training import backends

    monkeypatch.setattr(fp8, "check_supported", lambda config, device: None)
    monkeypatch.setattr(backends, "_load_unsloth", lambda *a, **k: pytest.fail("Unsloth was loaded"))
    events: list = []
    loaded = load_model(config(data, backend=backend), events.append)
    assert loaded.backend == "transformers"
    warnings = [e for e in events if e.type == "warning"]
    assert len(warnings) == int(warned)
    if warned:
        assert "transformers + PEFT" in warnings[0].message and warnings[0].code == "CONFIG_INVALID_SETTING"
    assert any(isinstance(m, fp8.Fp8Linear) for m in loaded.model.modules())
    assert fp8.backend_note(config(data, fp8=False, backend="unsloth")) is None


# Quantization and the layer ----------------------------------------------------------------------
def test_quantize_rows_round_trip():
    torch.manual_seed(0)
    # Rows of very different magnitudes: each gets its own scale.
    x = torch.randn(64, 512) * torch.logspace(-4, 3, 64).unsqueeze(1)
    x[5] = 0.0
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (64, 1)
    back = q.float() * scale
    assert torch.equal(back[5], torch.zeros(512))
    rows = [i for i in range(64) if i != 5]
    # e4m3 keeps 3 mantissa bits: rounding is within 2^-4 relative for values in its normal range.
    amax = x.abs().amax(dim=1, keepdim=True)
    normal = x.abs() >= amax * 2.0**-6 / 448 * 2**8  # well above e4m3's subnormals
    err = ((back - x).abs() / x.abs().clamp(min=1e-30))[normal]
    assert err.max().item() <= 2.0**-4 + 1e-6
    for i in rows:
        assert rel(back[i], x[i]) < 0.03
        assert q[i].float().abs().max().item() == 448.0  # each row's maximum lands on e4m3's maximum


def plain_and_fp8(bias: bool, dtype=torch.float32):
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 384, bias=bias).to(dtype)
    linear.requires_grad_(False)
    return linear, fp8.Fp8Linear(linear)


@pytest.mark.parametrize("bias", [False, True])
def test_emulated_forward_and_input_gradient_are_within_fp8_error(bias):
    linear, layer = plain_and_fp8(bias)
    x = torch.randn(3, 40, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), linear(x_ref)
    assert y.shape == y_ref.shape == (3, 40, 384)
    assert 1e-3 < rel(y, y_ref) < 5e-2  # really quantized, and not by more than e4m3 should
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert 1e-3 < rel(x.grad, x_ref.grad) < 5e-2
    assert not any(t.requires_grad for t in layer.buffers())
    assert list(layer.parameters()) == [] and layer.state_dict() == {}


def test_scaled_mm_layout_matches_the_emulation():
    """The real ``_scaled_mm`` call (operand order, transposes, scale shapes) where the CPU build has it."""
    _, layer = plain_and_fp8(True)
    x = torch.randn(48, 256)
    x_q, x_scale = fp8.quantize_rows(x)
    try:
        real = fp8.scaled_matmul(x_q, x_scale, layer.weight_fp8, layer.weight_scale, torch.float32)
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"no CPU _scaled_mm in this torch: {exc}")
    emulated = fp8.scaled_matmul(
        x_q, x_scale, layer.weight_fp8, layer.weight_scale, torch.float32, emulate=True
    )
    assert rel(real, emulated) < 1e-2  # the CPU kernel rounds its output to bf16
    g = torch.randn(48, 384)
    g_q, g_scale = fp8.quantize_rows(g)
    real_dx = fp8.scaled_matmul(g_q, g_scale, layer.weight_t_fp8, layer.weight_t_scale, torch.float32)
    assert rel(real_dx, g @ layer.dequantize()) < 5e-2


# The swap on a PEFT model -------------------------------------------------------------------------
def peft_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from backpropagate.models.demo import resolve_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model("demo"))
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def test_swap_covers_exactly_the_lora_base_layers(home):
    from peft.tuners.lora.layer import Linear as LoraLinear

    model = peft_model()
    lora_names = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    others = {n: type(m) for n, m in model.named_modules() if n and not n.startswith(tuple(lora_names))}
    swapped = fp8.apply_fp8(model)
    assert set(swapped) == lora_names and len(lora_names) == 7 * model.config.num_hidden_layers
    for name, module in model.named_modules():
        if name in lora_names:
            assert isinstance(module.base_layer, fp8.Fp8Linear)
        elif name in others:
            assert type(module) is others[name]  # lm_head, embeddings, norms untouched
    assert not any(p.dtype == torch.float8_e4m3fn for p in model.parameters())


def test_layers_whose_sizes_do_not_fit_stay():
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 20))
    net = get_peft_model(net, LoraConfig(r=4, target_modules=["0", "2"]))
    chosen, kept = fp8.fp8_candidates(net)
    assert [n.rsplit(".", 1)[-1] for n in chosen] == ["0"] and [n.rsplit(".", 1)[-1] for n in kept] == ["2"]


def test_lora_gradients_flow_and_the_output_stays_close(home):
    plain, quantized = peft_model(), peft_model()
    for model in (plain, quantized):
        torch.manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would hide A's gradient
                torch.nn.init.normal_(p, std=0.02)
    fp8.apply_fp8(quantized)
    ids = torch.randint(5, 200, (2, 32))
    out = {}
    for key, model in (("plain", plain), ("fp8", quantized)):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        out[key] = (loss.detach(), grads)
    (loss_plain, g_plain), (loss_fp8, g_fp8) = out["plain"], out["fp8"]
    assert abs(loss_fp8 - loss_plain) / loss_plain < 1e-2
    assert g_plain.keys() == g_fp8.keys() and any("lora_A" in n for n in g_fp8)
    for name in g_fp8:
        assert g_fp8[name] is not None and g_fp8[name].abs().sum() > 0, name
        # Each layer's input gradient adds e4m3 error on its way down: close in direction, not bitwise.
        cosine = torch.nn.functional.cosine_similarity(g_fp8[name].flatten(), g_plain[name].flatten(), dim=0)
        assert cosine > 0.95, (name, cosine)


def test_restore_linear_gives_back_the_dequantized_weight(home):
    model = peft_model()
    before = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    fp8.apply_fp8(model)
    assert fp8.restore_linear(model) == 7 * model.config.num_hidden_layers
    after = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(after) is torch.nn.Linear and rel(after.weight, before) < 0.03


# The engine, end to end (emulated on the CPU) ------------------------------------------------------
@pytest.mark.slow
def test_an_fp8_run_trains_and_saves_the_same_adapter_layout(data, tmp_path, monkeypatch):
    from safetensors import safe_open

    from backpropagate.training import run_training

    monkeypatch.setattr(fp8, "check_supported", lambda config, device: None)
    runs = {}
    for on in (False, True):
        result = run_training(config(data, fp8=on), tmp_path / f"fp8-{on}", lambda e: None)
        assert result.status == "completed"
        runs[on] = result
    plain, quantized = runs[False], runs[True]
    assert quantized.history[-1]["loss"] < quantized.history[0]["loss"]
    assert quantized.history[-1]["loss"] == pytest.approx(plain.history[-1]["loss"], rel=0.05)

    def layout(folder: Path) -> dict:
        with safe_open(folder / "adapter_model.safetensors", "pt") as fh:
            return {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}  # noqa: SIM118

    assert layout(quantized.adapter_path) == layout(plain.adapter_path)
    cfg = [json.loads((r.adapter_path / "adapter_config.json").read_text()) for r in (plain, quantized)]
    assert cfg[0] == cfg[1]
    names = {}
    for on in (False, True):  # checkpoints hold the adapter only, under the same names
        ckpt = sorted((tmp_path / f"fp8-{on}" / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"
        with safe_open(ckpt, "pt") as fh:
            names[on] = sorted(fh.keys())
    assert names[True] == names[False] and all("lora_" in n for n in names[True])
    assert sorted(p.name for p in quantized.adapter_path.iterdir()) == sorted(
        p.name for p in plain.adapter_path.iterdir()
    )
