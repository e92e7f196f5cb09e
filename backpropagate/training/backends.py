"""Model backends: load a base model, make it trainable (LoRA, QLoRA or full), pick device and precision.

Unsloth's ``FastLanguageModel`` is used when the config allows it, it imports and a CUDA GPU is
present; otherwise transformers + PEFT (with Liger kernels on GPU when installed). Falling back
from Unsloth on a GPU is announced once; on a CPU it is the expected path and stays quiet.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import EventBase, Warning_
from backpropagate.logs import RunLogger, get_logger

_log = get_logger(__name__)

# Unsloth wants explicit module names; these cover Llama, Qwen2/3, Mistral and Gemma.
_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoadedModel:
    """A model ready to train, and how it was set up."""

    model: Any
    tokenizer: Any
    backend: str  # "unsloth" | "transformers"
    device: Any  # torch.device
    dtype: Any  # torch dtype of the compute (autocast) precision
    precision: str  # "bf16" | "fp16" | "fp32"
    model_path: str
    gradient_checkpointing: bool
    liger: bool = False
    adapters_in_compute_dtype: bool = False  # then every weight already has the compute dtype

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision on GPU when the trainable weights are fp32; a no-op otherwise."""
        import torch

        if self.device.type == "cuda" and self.precision != "fp32" and not self.adapters_in_compute_dtype:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


# Device and precision --------------------------------------------------------------------------
def pick_device(config: RunConfig) -> Any:
    import torch

    has_cuda = torch.cuda.is_available()
    if config.device == "cuda" and not has_cuda:
        raise BackpropError(
            ErrorCode.DEP_GPU_NOT_AVAILABLE,
            "device='cuda' was asked for but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}).",
        )
    from backpropagate.training import distributed

    if distributed.is_initialized():
        # A rank of a group trains on its own GPU (cuda:LOCAL_RANK) under NCCL, on the CPU under gloo.
        return torch.device(distributed.device_name())
    if config.device == "cpu" or config.gpus == 0 or not has_cuda:
        return torch.device("cpu")
    return torch.device("cuda", 0)


def pick_precision(config: RunConfig, device: Any) -> tuple[str, Any]:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (unless asked otherwise)."""
    import torch

    wanted = config.precision
    if wanted == "auto":
        on_gpu = device.type == "cuda"
        wanted = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "fp32"
    if wanted == "fp16" and device.type != "cuda":
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            "precision='fp16' needs a CUDA GPU; use precision='fp32' (or 'auto') on CPU.",
        )
    if wanted == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"precision='bf16' is not supported by {torch.cuda.get_device_name(device)}; use 'fp16' or 'auto'.",
        )
    return wanted, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[wanted]


def check_machine(config: RunConfig, device: Any) -> None:
    """Settings that cannot work on this machine, found before any model is loaded."""
    if config.method == "qlora" and device.type != "cuda":
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            "method='qlora' loads the base model in 4-bit with bitsandbytes, which needs a CUDA GPU; "
            "this run is on CPU. Use method='lora' (or 'full') here.",
        )
    if config.optimizer == "adamw_8bit" and device.type != "cuda":
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            "optimizer='adamw_8bit' (bitsandbytes) needs a CUDA GPU; use optimizer='adamw' on CPU.",
        )
    if config.fp8:
        from backpropagate.training import fp8

        fp8.check_supported(config, device)


# Model resolution and load errors ---------------------------------------------------------------
def resolve_model_path(name: str) -> str:
    """Demo names -> their local folder (built on first use); folders -> absolute; hub ids unchanged."""
    from backpropagate.models.demo import resolve_model

    return resolve_model(name)


def load_tokenizer(path: str) -> Any:
    from backpropagate.models.tokenizer import load_tokenizer as _load

    try:
        tokenizer = _load(path)
    except Exception as exc:
        raise model_load_error(path, exc) from exc
    if tokenizer.pad_token_id is None:  # many base models ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def model_load_error(name: str, exc: BaseException) -> BackpropError:
    """Map the hub's and transformers' load failures to DEP_MODEL_LOAD_FAILED with cause and fix.

    transformers wraps the hub's exceptions in OSError, so the cause is found by walking the chain.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    chain = _chain(exc)
    kinds = tuple(type(e) for e in chain)

    def has(cls: type) -> bool:
        return any(issubclass(k, cls) for k in kinds)

    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if has(GatedRepoError):
        cause, hint = (
            f"'{name}' is a gated model (401: access not granted for this token).",
            f"Accept the license on https://huggingface.co/{name} and log in with "
            "`huggingface-cli login` (or set HF_TOKEN).",
        )
    elif has(RepositoryNotFoundError):
        cause, hint = (
            f"'{name}' was not found on the Hugging Face Hub (404, or private without a token).",
            "Check the spelling of the model id; private models need HF_TOKEN.",
        )
    elif looks_local or has(HFValidationError):
        cause, hint = (
            f"'{name}' is not a model folder (missing, or no config.json and weights in it).",
            "Pass an existing folder saved with save_pretrained, a hub id, or `demo`.",
        )
    elif has(LocalEntryNotFoundError):
        cause, hint = (
            f"'{name}' is not in the local cache and the hub cannot be reached (offline).",
            "Connect to the internet once to download it, unset HF_HUB_OFFLINE, "
            "or use a local folder or `demo`.",
        )
    else:
        cause, hint = f"'{name}' could not be loaded: {type(exc).__name__}: {exc}", None
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BackpropError(ErrorCode.DEP_MODEL_LOAD_FAILED, f"{cause} ({detail})", hint=hint, model=name)


# Loading -----------------------------------------------------------------------------------------
def _want_gradient_checkpointing(config: RunConfig, device: Any, n_params: int) -> bool:
    if config.gradient_checkpointing != "auto":
        return bool(config.gradient_checkpointing)
    # Activations dominate memory for long sequences on big models; tiny CPU runs never need it.
    return device.type == "cuda" and (config.method != "lora" or n_params > 3e9 or config.max_seq_len > 4096)


def _lora_config(config: RunConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _load_transformers(config: RunConfig, path: str, device: Any, precision: str, dtype: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    # Full fine-tuning keeps fp32 master weights (autocast computes in bf16/fp16): AdamW's small
    # updates would round away in bf16 weights. Adapters train in fp32 on a low-precision base.
    kwargs: dict[str, Any] = {"dtype": torch.float32 if config.method == "full" else dtype}
    if config.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device.index or 0}
    if device.type == "cuda":
        kwargs["attn_implementation"] = "sdpa"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as exc:  # bitsandbytes or another optional piece missing
        raise BackpropError(
            ErrorCode.DEP_EXTRA_MISSING,
            f"Loading '{path}' for method={config.method} needs a package that is missing: {exc}",
            hint="`pip install 'backpropagate[gpu]'` installs bitsandbytes and liger-kernel.",
        ) from exc
    except Exception as exc:
        raise model_load_error(config.model if not Path(path).exists() else path, exc) from exc
    if config.method != "qlora":
        model.to(device)
    return model


def _apply_liger(
    config: RunConfig, model: Any, device: Any, emit: Callable[[EventBase], None], log: RunLogger
) -> bool:
    if device.type != "cuda" or config.use_liger is False:
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        if config.use_liger is True:
            emit(
                Warning_(
                    code=str(ErrorCode.DEP_EXTRA_MISSING),
                    message="use_liger=True but liger-kernel is not installed; training without it.",
                    hint="pip install 'backpropagate[gpu]'",
                )
            )
        return False
    try:
        _apply_liger_kernel_to_instance(model=model)
    except Exception as exc:  # an architecture Liger does not know: plain kernels still train
        log.info("Liger kernels not applied: %s", exc)
        return False
    return True


def adapters_in_compute_dtype(config: RunConfig, device: Any, precision: str) -> bool:
    """bf16 LoRA weights on GPU skip a cast per layer and autocast (measured +15% tokens/s on an H200).

    fp16 keeps fp32 adapters: the gradient scaler needs fp32 parameters.
    """
    if config.method != "lora" or precision == "fp32" or config.adapter_dtype == "fp32":
        return False
    return config.adapter_dtype == "compute" or (device.type == "cuda" and precision == "bf16")


def _make_trainable(
    config: RunConfig, model: Any, gradient_checkpointing: bool, keep_compute_dtype: bool = False
) -> Any:
    import torch

    if gradient_checkpointing:
        # transformers 5.24 renamed it (and its argument); older 5.x releases have only the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings would cut the graph otherwise
    # Seeded so that the LoRA initialisation is the same for the same seed.
    torch.manual_seed(config.seed)
    with warnings.catch_warnings():
        # PEFT asks transformers 5 a question by its deprecated name; nothing for a user to do.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # PEFT upcasts adapters to fp32 unless told otherwise.
        return get_peft_model(model, _lora_config(config), autocast_adapter_dtype=not keep_compute_dtype)


def _load_unsloth(config: RunConfig, path: str, dtype: Any, gradient_checkpointing: bool) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # noqa: I001 - must come before transformers patches

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=config.max_seq_len,
        dtype=dtype,
        load_in_4bit=config.method == "qlora",
        full_finetuning=config.method == "full",
    )
    if config.method != "full":
        targets = _ALL_LINEAR if config.target_modules == "all-linear" else list(config.target_modules)
        model = FastLanguageModel.get_peft_model(
            model,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            use_rslora=config.use_rslora,
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
            random_state=config.seed,
        )
    return model, tokenizer


def preload_unsloth(config: RunConfig, device: Any, log: RunLogger = _log) -> None:
    """Import Unsloth before anything imports transformers, so that its patches apply."""
    if device.type != "cuda" or config.backend == "transformers" or config.use_dora or config.fp8:
        return
    try:
        import unsloth  # noqa: F401
    except Exception as exc:  # reported when the model is loaded
        log.info("Unsloth not importable: %s", exc)


def load_model(
    config: RunConfig,
    emit: Callable[[EventBase], None],
    *,
    tokenizer: Any | None = None,
    gradient_checkpointing: bool | None = None,
    log: RunLogger = _log,
) -> LoadedModel:
    """Load the base model for ``config`` on the best backend available and make it trainable.

    ``gradient_checkpointing`` overrides the config's ``auto`` choice (the memory model decides it).
    """
    device = pick_device(config)
    check_machine(config, device)
    precision, dtype = pick_precision(config, device)
    path = resolve_model_path(config.model)
    if tokenizer is None:
        tokenizer = load_tokenizer(path)

    want_unsloth = config.backend in ("auto", "unsloth") and not config.use_dora and not config.fp8
    if config.fp8:  # FP8 replaces the base weights that Unsloth's kernels read
        from backpropagate.training import fp8

        fp8.announce_backend(config, emit, log)
    if want_unsloth and device.type == "cuda":
        try:
            gc_flag = gradient_checkpointing
            if gc_flag is None:
                gc_flag = _want_gradient_checkpointing(config, device, 0)
            model, _ = _load_unsloth(config, path, dtype, gc_flag)
            load_initial_adapter(config, model)
            # Autocast only pays when some trainable weight is wider than the compute dtype.
            uniform = all(p.dtype == dtype for p in model.parameters() if p.requires_grad)
            return LoadedModel(
                model, tokenizer, "unsloth", device, dtype, precision, path, gc_flag, False, uniform
            )
        except Exception as exc:  # ImportError, unsupported architecture, CUDA/driver mismatch, ...
            if not config.unsloth_fallback:
                raise BackpropError(
                    ErrorCode.DEP_UNSLOTH_UNAVAILABLE, f"Unsloth load failed ({type(exc).__name__}: {exc})."
                ) from exc
            message = (
                f"Unsloth load failed ({type(exc).__name__}: {exc}); falling back to transformers + PEFT"
            )
            log.warning(message)
            emit(Warning_(code=str(ErrorCode.DEP_UNSLOTH_UNAVAILABLE), message=message))
    elif config.backend == "unsloth" and not config.unsloth_fallback:
        raise BackpropError(
            ErrorCode.DEP_UNSLOTH_UNAVAILABLE,
            "backend='unsloth' needs a CUDA GPU"
            + (" and does not do DoRA" if config.use_dora else "")
            + f"; this run is on {device.type}.",
        )

    model = _load_transformers(config, path, device, precision, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    gc_flag = gradient_checkpointing
    if gc_flag is None:
        gc_flag = _want_gradient_checkpointing(config, device, n_params)
    liger = _apply_liger(config, model, device, emit, log)
    compute_dtype_adapters = adapters_in_compute_dtype(config, device, precision)
    model = _make_trainable(config, model, gc_flag, keep_compute_dtype=compute_dtype_adapters)
    load_initial_adapter(config, model)
    if config.method != "full" and precision != "fp32" and not compute_dtype_adapters:
        # Trainable LoRA weights in fp32 keep AdamW's tiny updates from rounding away.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if config.fp8:
        from backpropagate.training import fp8

        fp8.apply_fp8(model, log)
    return LoadedModel(
        model,
        tokenizer,
        "transformers",
        device,
        dtype,
        precision,
        path,
        gc_flag,
        liger,
        compute_dtype_adapters,
    )


def load_initial_adapter(config: RunConfig, model: Any) -> None:
    """Start the LoRA weights from ``config.init_adapter`` (a saved PEFT adapter) instead of fresh ones.

    A resumed run then overwrites them with its checkpoint, as it does any initialisation.
    """
    if not config.init_adapter:
        return
    folder = Path(config.init_adapter).expanduser()
    if config.method == "full":
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING, "init_adapter needs method='lora' or 'qlora', not 'full'."
        )
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING, f"init_adapter: {weights} does not exist (not a saved adapter)."
        )
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        loaded = set_peft_model_state_dict(model, load_file(str(weights)))
    except RuntimeError as exc:  # a rank or module shape that differs from this run's
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"init_adapter {folder} does not fit this model and LoRA rank: {' '.join(str(exc).split())[:300]}",
            hint="Start from an adapter trained on the same base model with the same lora_r and target_modules.",
        ) from None
    if loaded.unexpected_keys:
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"init_adapter {folder} has weights this model lacks (e.g. {loaded.unexpected_keys[0]}).",
            hint="Start from an adapter trained on the same base model with the same target_modules.",
        )


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None:  # a 4-bit tensor stores two weights a byte
            n = math.prod(p.quant_state.shape)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
