"""RunConfig: every hyperparameter of a training run, validated, with defaults.

The one source of truth for a run: the CLI's `train` options, the API's request body, the UI
form and the worker's ``RUN_DIR/config.json`` are all this model. Checks that need the machine
(is there a GPU for QLoRA?) happen in the engine; everything else is checked here, all problems
reported at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backpropagate.errors import BackpropError, ErrorCode

Method = Literal["lora", "qlora", "full"]
Preset = Literal["fast", "balanced", "quality"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]
DataFormat = Literal["auto", "sharegpt", "openai", "alpaca", "text", "preference", "kto"]

# Values a preset fills in for every field the user did not set explicitly.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"lora_r": 8, "lora_alpha": 16, "lr": 3e-4, "packing": True, "eval_fraction": 0.0},
    "balanced": {"lora_r": 16, "lora_alpha": 32, "lr": 2e-4},
    "quality": {
        "lora_r": 64,
        "lora_alpha": 64,
        "use_rslora": True,
        "lr": 1e-4,
        "warmup_ratio": 0.05,
        "eval_fraction": 0.05,
    },
}

# A first run on a demo model should visibly learn within seconds on any CPU: 150 steps at these
# values take the quickstart data's loss from ~6.5 to ~0.8, and the chat then answers its
# questions from the data ("There are seven days in a week."). Every door (CLI, API, web form,
# Python) fills these in for the fields the user left unset, after a preset.
DEMO_DEFAULTS: dict[str, Any] = {"batch_size": 1, "grad_accum": 1, "lr": 5e-3}
DEMO_STEPS = 150  # when neither steps nor epochs is given


def is_demo_model(model: Any) -> bool:
    return isinstance(model, str) and model.startswith("demo")


class MultiRun(BaseModel):
    """A multi-run schedule (docs/multi-run.md): runs on fresh chunks of the data, adapters merged between."""

    model_config = ConfigDict(extra="forbid")

    num_runs: int = Field(..., ge=1, description="Number of runs.")
    steps_per_run: int = Field(..., ge=1, description="Optimizer steps per run.")
    samples_per_run: int = Field(..., ge=1, description="New rows each run trains on.")
    merge: Literal["slao", "linear"] = Field("slao", description="How each run's adapter is merged in.")
    validate_every_run: bool = Field(True, description="Validate every merge on the 10% holdout.")
    early_stopping: bool = Field(True, description="Stop once `patience` runs bring no better validation.")
    patience: int = Field(2, ge=1, description="Runs without a better validation loss before stopping.")
    min_delta: float = Field(0.0, ge=0, description="How much lower a validation loss must be to count.")
    wrap: bool = Field(False, description="Once every row was trained on, reshuffle the pool and go on.")
    track_forgetting: bool = Field(False, description="After each merge, the loss on every earlier chunk.")


class RunConfig(BaseModel):
    """A complete description of one training run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # What to train
    name: str | None = Field(None, max_length=200, description="A label for the run (shown in the UI).")
    model: str = Field(
        "demo",
        min_length=1,
        description="Base model: `demo`, `demo-llama`, `demo-qwen2`, a local folder or a hub id.",
    )
    data: str = Field(
        ..., min_length=1, description="Training data: a file, a folder, an uploaded data set id or a hub id."
    )
    eval_data: str | None = Field(None, description="Separate evaluation data (else a held-out split).")
    data_format: DataFormat = Field("auto", description="Data set format; `auto` detects it per file.")
    skip_bad_rows: bool = Field(False, description="Skip and count malformed rows instead of failing.")
    train_on: Literal["responses", "all"] = Field(
        "responses", description="Compute the loss on assistant responses only, or on every token."
    )
    packing: bool = Field(True, description="Pack short examples into full sequences.")
    max_seq_len: int = Field(1024, ge=16, le=131072, description="Longest sequence in tokens.")

    # Method
    method: Method = Field("lora", description="LoRA adapters, QLoRA (4-bit base, GPU only), or full.")
    preset: Preset | None = Field(None, description="Fills in sensible values for unset fields.")
    lora_r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: `all-linear` or a list of names."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    init_adapter: str | None = Field(
        None, description="Start the LoRA weights from this saved adapter folder instead of fresh ones."
    )
    multi_run: MultiRun | None = Field(
        None,
        description="Train as a multi-run with this schedule (docs/multi-run.md); JSON text is accepted.",
    )

    # Objective
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto"] = Field(
        "sft",
        description=(
            "Training objective. `sft` learns the responses (preference rows train on `chosen`); "
            "`dpo`, `orpo`, `simpo` need {prompt, chosen, rejected} pairs; `kto` takes "
            "{prompt, completion, label} rows or pairs (see docs/preference.md)."
        ),
    )
    beta: float = Field(
        0.1, gt=0, description="DPO and KTO: strength of the pull towards the reference model."
    )
    dpo_loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="DPO: loss on the reward margin (sigmoid = DPO, ipo = IPO, hinge = SLiC)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="DPO (sigmoid): assumed share of pairs whose labels are flipped."
    )
    simpo_beta: float = Field(2.0, gt=0, description="SimPO: scale of the length-averaged log-probs.")
    simpo_gamma: float = Field(
        0.5, ge=0, description="SimPO: target reward margin, as a ratio of `simpo_beta` (gamma/beta)."
    )
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO: weight of the odds-ratio term beside SFT.")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of desirable rows.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of undesirable rows.")

    # Schedule
    steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides `epochs` when set.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data when `steps` is not set.")
    batch_size: int | Literal["auto"] = Field(
        2, description="Micro-batch per device, or `auto` to pick the fastest that fits in memory."
    )
    grad_accum: int = Field(4, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR schedule.")
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optimizer: Literal["adamw", "adamw_8bit"] = Field("adamw", description="Optimizer.")
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")

    # Evaluation and checkpoints
    eval_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="Fraction of rows held out for evaluation (0 disables)."
    )
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (default: at the end).")
    save_every: int = Field(50, ge=1, description="Write a checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(3, ge=1, description="Keep the last N checkpoints (plus the best).")
    log_every: int = Field(1, ge=1, description="Emit a step event every N optimizer steps.")
    output_dir: str | None = Field(None, description="Where the adapter goes (default: the run folder).")
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers fed from the run's events (none by default): `tensorboard` "
        "writes under the run folder's `tensorboard/`; `wandb`, `mlflow` and `trackio` follow their own "
        "environment variables (docs/trackers.md).",
    )

    # Hardware and backend
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Train on the GPU if present.")
    gpus: Annotated[int, Field(ge=0, le=64)] | Literal["all"] = Field(
        1,
        description="GPUs the run needs (0 = CPU, `all` = every GPU of the machine); more than one "
        "trains data-parallel, one process per GPU (docs/scaling.md).",
    )
    gpu_ids: list[int] | None = Field(
        None,
        description="Exactly these GPU indices (as `backprop info` lists them), instead of any free `gpus`.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="`auto`: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Trade compute for memory; `auto` decides from the memory estimate."
    )
    backend: Literal["auto", "unsloth", "transformers"] = Field(
        "auto", description="`auto`: Unsloth when it loads on a CUDA GPU, else transformers + PEFT."
    )
    unsloth_fallback: bool = Field(True, description="Fall back to transformers + PEFT if Unsloth fails.")
    use_liger: bool | Literal["auto"] = Field("auto", description="Liger kernels on GPU when installed.")
    adapter_dtype: Literal["auto", "fp32", "compute"] = Field(
        "auto",
        description="LoRA weights in fp32 or in the compute dtype; `auto`: compute dtype with bf16 on GPU "
        "(faster, no casts), fp32 otherwise.",
    )
    fp8: bool = Field(
        False,
        description="LoRA on an FP8 base: the frozen base weights in float8 (e4m3), their matmuls on FP8 "
        "tensor cores (GPUs of compute capability 8.9+: Ada, Hopper, Blackwell); the adapter, norms and "
        "loss stay bf16/fp32. method='lora' only; trains on transformers + PEFT, not Unsloth.",
    )
    oom_recovery: bool = Field(True, description="On out-of-memory, halve the micro-batch and retry.")

    # GPU temperature guard (degrees Celsius)
    temp_warn_c: float = Field(80, description="Warn at this GPU temperature.")
    temp_pause_c: float = Field(90, description="Pause training at this temperature.")
    temp_resume_c: float = Field(80, description="Resume once the card is below this temperature.")
    temp_emergency_c: float = Field(95, description="Checkpoint and stop at this temperature.")
    telemetry_interval_s: float = Field(5.0, gt=0, description="Seconds between GPU telemetry samples.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("preset") in PRESETS:
            filled = dict(PRESETS[data["preset"]])
            filled.update({k: v for k, v in data.items() if v is not None or k not in filled})
            data = filled
        if data.get("gpu_ids") and data.get("gpus") is None:  # the ids say how many
            data = {**data, "gpus": len(data["gpu_ids"])}
        if is_demo_model(data.get("model", "demo")):
            data = dict(data)
            for key, value in DEMO_DEFAULTS.items():
                if data.get(key) is None:
                    data[key] = value
            if data.get("steps") is None and data.get("epochs") is None:
                data["steps"] = DEMO_STEPS
        return data

    @field_validator("multi_run", mode="before")
    @classmethod
    def _schedule_from_text(cls, value: Any) -> Any:
        """A schedule given as JSON text (a form field or a flag)."""
        if isinstance(value, str):
            return json.loads(value) if value.strip() else None
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _split_trackers(cls, value: Any) -> Any:
        """`tensorboard` or `a,b` from a form field or a flag, as a list."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        problems = []
        if not self.temp_resume_c < self.temp_pause_c <= self.temp_emergency_c:
            problems.append("temperatures must satisfy temp_resume_c < temp_pause_c <= temp_emergency_c")
        if self.method == "full" and (self.use_dora or self.use_rslora):
            problems.append("use_dora/use_rslora apply to LoRA methods, not method='full'")
        if self.method == "qlora" and self.device == "cpu":
            problems.append("method='qlora' needs a CUDA GPU; use method='lora' on CPU")
        if self.gpu_ids is not None:
            if self.device == "cpu":
                problems.append("gpu_ids names GPUs but device='cpu'")
            if not self.gpu_ids or len(set(self.gpu_ids)) != len(self.gpu_ids) or min(self.gpu_ids) < 0:
                problems.append("gpu_ids must list one or more distinct GPU indices (0, 1, ...)")
            elif self.gpus != len(self.gpu_ids):
                problems.append(f"gpus={self.gpus} disagrees with gpu_ids={self.gpu_ids}; give one of them")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            problems.append("batch_size must be >= 1 or 'auto'")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def effective_batch_size(self) -> int | None:
        return None if self.batch_size == "auto" else self.batch_size * self.grad_accum

    @classmethod
    def parse(cls, data: dict[str, Any]) -> RunConfig:
        """Validate user input, raising CONFIG_INVALID that lists every problem at once."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise config_error(exc) from None

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        return cls.parse(json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


def config_error(exc: ValidationError) -> BackpropError:
    """Turn pydantic's report into one CONFIG_INVALID naming each field and what was expected."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return BackpropError(
        ErrorCode.CONFIG_INVALID, "Invalid run configuration: " + "; ".join(parts), problems=parts
    )
