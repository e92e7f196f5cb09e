"""FP8 LoRA: the frozen base weights of LoRA layers in float8, their matmuls through ``torch._scaled_mm``.

LoRA never changes the base weights, so each LoRA-wrapped ``nn.Linear`` is cast to e4m3 once,
after PEFT has wrapped the model, and both of its matmuls run on the FP8 tensor cores:

    forward      y  = x @ W^T    x per row (per token) to e4m3, W per output channel
    input grad   dx = dy @ W     dy per row to e4m3, W per input channel (a second copy)

W gets no gradient. LoRA A/B, norms, attention, softmax and the loss run as without FP8
(bf16/fp32), and the FP8 copies are non-persistent buffers: checkpoints and the saved adapter
are the same files as a bf16 run's.

Choices, and why:
- Gradients in e4m3, not e5m2. With one scale per row, each row's largest value lands on e4m3's
  maximum (448): e5m2's wider range buys nothing there, and e4m3's third mantissa bit halves the
  rounding error. e5m2 pays in per-tensor recipes, where one scale must cover every row.
- Two weight copies. ``_scaled_mm``'s row-wise scales sit on the rows of its first operand and the
  columns of its second. The input gradient contracts over W's output channels, where the forward
  copy's scales sit, so it gets a copy scaled per input channel, stored transposed because the
  second operand must be column-major. Two e4m3 copies take the memory of one bf16 weight.
- Fast accumulation in the forward only (as common FP8 recipes do): gradients are the more sensitive.
- Layers whose sizes are not multiples of 16 (a ``_scaled_mm`` requirement) stay in bf16.
- The transformers + PEFT path only: Unsloth's fused LoRA kernels read the bf16 base weight.
- Full fine-tuning in FP8 (weight gradients, master weights) is refused: it wants a maintained
  library (torchao's float8 training), which is not a dependency.

On the CPU the same quantization is emulated (dequantize, then an fp32 matmul): the unit tests
run it, and it is the reference the device check compares ``_scaled_mm`` against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import EventBase, Warning_
from backpropagate.logs import RunLogger, get_logger

_log = get_logger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
MIN_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0
ALIGN = 16  # _scaled_mm wants K and N multiples of 16
FAST_ACCUM_FORWARD = True
FAST_ACCUM_BACKWARD = False

# Row quantization in eager mode is six passes over the activations; compiled it is one read for
# the maximum and one for the cast. The device check times both (it sets this to False).
compile_quantize = True


# Machine and settings ----------------------------------------------------------------------------
def check_supported(config: RunConfig, device: Any) -> None:
    """Refuse ``fp8=True`` where it cannot run, before anything is loaded.

    The machine first: on a card without FP8 the answer is to drop ``--fp8``, whatever else is set.
    """
    if not config.fp8:
        return
    if device.type != "cuda":
        raise BackpropError(
            ErrorCode.RUNTIME_FP8_UNSUPPORTED,
            f"fp8=True needs an NVIDIA GPU with FP8 tensor cores; this run is on {device.type}.",
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise BackpropError(
            ErrorCode.RUNTIME_FP8_UNSUPPORTED,
            f"fp8=True needs FP8 tensor cores (compute capability 8.9 or newer); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}.",
        )
    if not hasattr(torch, "_scaled_mm"):
        raise BackpropError(
            ErrorCode.RUNTIME_FP8_UNSUPPORTED,
            f"fp8=True needs torch._scaled_mm, which torch {torch.__version__} lacks.",
            hint="Install torch 2.5 or newer.",
        )
    problems = settings_problems(config)
    if problems:
        raise BackpropError(ErrorCode.CONFIG_INVALID_SETTING, "; ".join(problems), problems=problems)


def settings_problems(config: RunConfig) -> list[str]:
    """What in ``config`` does not go with ``fp8=True``, each with its fix."""
    problems = []
    if config.method != "lora":
        problems.append(
            f"fp8=True trains LoRA on a bf16 base (method='lora'); method='{config.method}' in FP8 "
            "needs a maintained FP8 training library such as torchao's float8, which is not installed. "
            "Use method='lora', or drop fp8"
        )
    if config.use_dora:
        problems.append(
            "fp8=True does not do DoRA (its magnitude vector reads the bf16 weight); drop use_dora"
        )
    if config.precision in ("fp16", "fp32"):
        problems.append(
            f"fp8=True computes in bf16; use precision='bf16' or 'auto', not '{config.precision}'"
        )
    if config.backend == "unsloth" and not config.unsloth_fallback:
        problems.append(
            "fp8=True runs on transformers + PEFT, but backend='unsloth' with unsloth_fallback=False "
            "allows Unsloth only; use backend='auto' or 'transformers', or drop fp8"
        )
    return problems


def backend_note(config: RunConfig) -> str | None:
    """Why an FP8 run does not use Unsloth; a warning when Unsloth was asked for by name."""
    if not config.fp8 or config.backend == "transformers":
        return None
    return (
        f"fp8=True trains on transformers + PEFT, not Unsloth (backend='{config.backend}'): "
        "Unsloth's fused LoRA kernels read the bf16 base weights, which FP8 replaces"
    )


def announce_backend(config: RunConfig, emit: Callable[[EventBase], None], log: RunLogger = _log) -> None:
    """Say that an FP8 run takes the transformers + PEFT path: a warning event when Unsloth was
    asked for by name, a log line when ``backend='auto'`` would have picked it."""
    note = backend_note(config)
    if note is None:
        return
    if config.backend == "unsloth":
        log.warning(note)
        emit(Warning_(code=str(ErrorCode.CONFIG_INVALID_SETTING), message=note))
    else:
        log.info(note)


# Quantization ------------------------------------------------------------------------------------
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] as e4m3 values [M, K] and fp32 scales [M, 1], with ``x ~ q * scale`` per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    # A row of zeros gets a tiny scale, so it quantizes to zeros rather than to 0/0.
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


_compiled: Any = None
_compile_failed = False


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    global _compiled, _compile_failed
    if not (compile_quantize and x.is_cuda) or _compile_failed:
        return quantize_rows(x)
    if _compiled is None:
        _compiled = torch.compile(quantize_rows, dynamic=None)
    try:
        return _compiled(x)
    except torch.cuda.OutOfMemoryError:
        raise  # OOM recovery handles it; the eager version would need more memory, not less
    except Exception as exc:  # no Triton, an inductor failure: the eager version computes the same
        _compile_failed = True
        _log.warning("fp8: compiled quantization failed (%s: %s); using eager ops", type(exc).__name__, exc)
        return quantize_rows(x)


def scaled_matmul(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_q: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    fast_accum: bool = False,
    emulate: bool = False,
) -> torch.Tensor:
    """``(a_q * a_scale) @ (b_q * b_scale^T)^T``: a_q [M, K] and b_q [N, K] in e4m3, row-major;
    a_scale [M, 1], b_scale [1, N] in fp32.

    ``b_q.t()`` is the column-major [K, N] operand ``_scaled_mm`` wants, without a copy.
    ``emulate`` computes the same in fp32 from the dequantized operands.
    """
    if emulate:
        a = a_q.float() * a_scale
        b = b_q.float() * b_scale.reshape(-1, 1)
        return (a @ b.t()).to(out_dtype)
    # Row-wise scaling writes bf16 only; any other dtype is a cast of that.
    out = torch._scaled_mm(
        a_q, b_q.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16, use_fast_accum=fast_accum
    )
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ W^T (+ b) with a frozen W held in e4m3; backward gives dx only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        w_q: torch.Tensor,
        w_scale: torch.Tensor,
        wt_q: torch.Tensor,
        wt_scale: torch.Tensor,
        bias: torch.Tensor | None,
        emulate: bool,
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):  # the scales and casts are ours to choose
            x_q, x_scale = _quantize(x.reshape(-1, x.shape[-1]))
            out = scaled_matmul(
                x_q, x_scale, w_q, w_scale, x.dtype, fast_accum=FAST_ACCUM_FORWARD, emulate=emulate
            )
            if bias is not None:
                out = out + bias.to(out.dtype)
        # Nothing per token is kept: dx needs only dy and the (already resident) transposed copy.
        ctx.save_for_backward(wt_q, wt_scale)
        ctx.emulate, ctx.x_dtype = emulate, x.dtype
        return out.reshape(*lead, w_q.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        wt_q, wt_scale = ctx.saved_tensors
        lead = grad.shape[:-1]
        with torch.autocast(grad.device.type, enabled=False):
            g_q, g_scale = _quantize(grad.reshape(-1, grad.shape[-1]))
            dx = scaled_matmul(
                g_q, g_scale, wt_q, wt_scale, ctx.x_dtype, fast_accum=FAST_ACCUM_BACKWARD, emulate=ctx.emulate
            )
        return dx.reshape(*lead, wt_q.shape[0]), None, None, None, None, None, None


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is held in e4m3: one copy per output channel for the
    forward, one per input channel (transposed) for the input gradient.

    The copies are non-persistent buffers, so ``state_dict()`` holds nothing of this layer: a
    checkpoint or adapter never carries FP8 weights. ``emulate`` forces the fp32 reference on GPU;
    on the CPU it is always used.
    """

    def __init__(self, linear: nn.Linear, emulate: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.emulate = emulate
        weight = linear.weight.detach()
        self.compute_dtype = weight.dtype
        w_q, w_scale = quantize_rows(weight)
        wt_q, wt_scale = quantize_rows(weight.t())
        self.register_buffer("weight_fp8", w_q, persistent=False)
        self.register_buffer("weight_scale", w_scale.reshape(1, -1).contiguous(), persistent=False)
        self.register_buffer("weight_t_fp8", wt_q, persistent=False)
        self.register_buffer("weight_t_scale", wt_scale.reshape(1, -1).contiguous(), persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emulate = self.emulate or not x.is_cuda
        return _Fp8Matmul.apply(
            x, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale, self.bias, emulate
        )

    def dequantize(self) -> torch.Tensor:
        """The weight as the forward sees it, in fp32 [out, in]."""
        return self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


# The swap ----------------------------------------------------------------------------------------
def fp8_candidates(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of the LoRA layers whose base gets FP8, names of those that stay as they are)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    chosen, kept = [], []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        base = module.base_layer
        fits = (
            type(base) is nn.Linear
            and base.in_features % ALIGN == 0
            and base.out_features % ALIGN == 0
            and not base.weight.requires_grad
            and not module.merged
            and not module.lora_variant  # DoRA and friends read the base weight
        )
        (chosen if fits else kept).append(name)
    return chosen, kept


def apply_fp8(model: nn.Module, log: RunLogger = _log, emulate: bool = False) -> list[str]:
    """Swap the base ``nn.Linear`` of every fitting LoRA layer for an :class:`Fp8Linear`.

    Run once, after PEFT wrapped the model; returns the names of the swapped LoRA layers. The bf16
    weights are freed as each layer is swapped, so the peak stays near one bf16 model.
    """
    chosen, kept = fp8_candidates(model)
    modules = dict(model.named_modules())
    for name in chosen:
        lora = modules[name]
        lora.base_layer = Fp8Linear(lora.base_layer, emulate=emulate)
    if kept:
        log.info("fp8: %d LoRA layers stay in %s (sizes or kind): %s", len(kept), "bf16", ", ".join(kept[:4]))
    log.info("fp8: %d LoRA base layers in float8_e4m3fn", len(chosen))
    return chosen


def restore_linear(model: nn.Module) -> int:
    """Swap every :class:`Fp8Linear` back for an ``nn.Linear`` holding its dequantized weight.

    For code that needs ``base_layer.weight`` (merging an adapter in place); returns the count.
    """
    count = 0
    for module in list(model.modules()):
        base = getattr(module, "base_layer", None)
        if isinstance(base, Fp8Linear):
            linear = nn.Linear(
                base.in_features,
                base.out_features,
                bias=base.bias is not None,
                device=base.weight_fp8.device,
                dtype=base.compute_dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(base.dequantize())
                if base.bias is not None:
                    linear.bias.copy_(base.bias)
            linear.requires_grad_(False)
            module.base_layer = linear
            count += 1
    return count
