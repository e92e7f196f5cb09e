"""Supervised fine-tuning, as one recipe: setup -> fit -> save.

We run our own loop rather than TRL's ``SFTTrainer``. The loop is ~150 lines we can read, and it
owns the three things this product promises: (1) exact resume: a checkpoint stores the data
position, RNG states, optimizer and scheduler, and the loop restarts at that optimizer step with
nothing hidden in a framework's callbacks; (2) OOM recovery at the same step: an optimizer step is
a fixed list of examples, so a failed step can be redone from its start with a smaller micro-batch
and the same effective batch; (3) events: every step, eval and checkpoint is reported as it
happens. Loss is normalised by the loss-carrying tokens of the whole optimizer step
(``num_items_in_batch``), so how a step is split into micro-batches does not change its gradient.

Under torchrun every rank runs this same recipe, data-parallel (docs/scaling.md): each rank takes
the same optimizer step's examples and trains its own shard of them; the gradients are summed
over the ranks once every rank's backward passes are done, so the step is the one-process step
and a rank out of memory can make the whole group redo it with a smaller micro-batch. Rank 0
alone evaluates and writes checkpoints and the adapter; the decisions (stop, pause, micro-batch)
are taken together at step boundaries.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from backpropagate.config import RunConfig
from backpropagate.data.preference import row_tokens
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import (
    Cancelled,
    Checkpoint,
    Completed,
    Eval,
    EventBase,
    OomRecovered,
    RunStarted,
    Status,
    Step,
    Warning_,
)
from backpropagate.logs import get_logger
from backpropagate.training import checkpoints as ckpt
from backpropagate.training import distributed as d
from backpropagate.training.backends import (
    LoadedModel,
    check_machine,
    count_parameters,
    load_model,
    load_tokenizer,
    pick_device,
    preload_unsloth,
    resolve_model_path,
)
from backpropagate.training.control import RunControl
from backpropagate.training.data_order import DataOrder, DataPosition, label_tokens, split_micro_batches
from backpropagate.training.evaluation import evaluate, to_device
from backpropagate.training.faults import FaultInjector
from backpropagate.training.optim import build_optimizer, build_scheduler, choose_micro_batch, total_steps
from backpropagate.training.preference_step import STEP_METRICS, PreferenceLoss, evaluate_preference
from backpropagate.training.result import TrainResult

Emit = Callable[[EventBase], None]
MAX_OOM_RETRIES_AT_MIN = 3


@dataclass
class TrainState:
    """Everything about the loop's progress that a checkpoint must carry."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    micro_batch: int = 1
    grad_accum: int = 1
    effective_batch: int = 1
    tokens_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    rank_rng: list[dict[str, str]] | None = None  # every rank's RNG, in a group (rank 0's is rng.pt too)

    def to_json(self, run_id: str, seed: int) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "epoch": self.position.epoch,
            "index": self.position.index,
            "data_seed": seed,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "effective_batch": self.effective_batch,
            "tokens_seen": self.tokens_seen,
            "history": self.history,
            "eval_history": self.eval_history,
            **({"rank_rng": self.rank_rng} if self.rank_rng else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        return cls(
            step=data["step"],
            position=DataPosition(data["epoch"], data["index"]),
            micro_batch=data["micro_batch"],
            grad_accum=data["grad_accum"],
            effective_batch=data["effective_batch"],
            tokens_seen=data.get("tokens_seen", 0),
            history=data.get("history", []),
            eval_history=data.get("eval_history", []),
            rank_rng=data.get("rank_rng"),
        )

    @property
    def last_eval_loss(self) -> float | None:
        return self.eval_history[-1]["loss"] if self.eval_history else None


@dataclass
class Run:
    """What setup() builds and fit() uses."""

    config: RunConfig
    run_dir: Path
    run_id: str
    emit: Emit
    control: RunControl
    loaded: LoadedModel
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    optimizer: Any
    scheduler: Any
    scaler: Any
    order: DataOrder
    state: TrainState
    total_steps: int
    faults: FaultInjector
    resumed_from_step: int | None = None
    preference: PreferenceLoss | None = None  # the loss of a chunk, for every objective but SFT

    @property
    def mask_dtype(self) -> Any:
        """The dtype of a 4D attention mask: the attention's own on GPU, float32 on CPU."""
        import torch

        return self.loaded.dtype if self.loaded.device.type == "cuda" else torch.float32

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


def run_training(
    config: RunConfig, run_dir: Path, emit: Emit, control: RunControl | None = None
) -> TrainResult:
    """Train ``config`` in ``run_dir``, resuming from its last good checkpoint; see the package docstring."""
    import torch

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        run = setup(config, run_dir, emit, control or RunControl())
        # One monitor per machine watches all of its GPUs; a hot one pauses the group (fit()).
        monitor = (
            _start_monitor(config, emit, run.control)
            if not d.is_initialized() or d.local_rank() == 0
            else None
        )
        try:
            result = fit(run)
        finally:
            if monitor is not None:
                monitor.stop()
        # Rank 0 writes the adapter; the others are done (a barrier here could time out on a
        # large full model's save and take rank 0 down with it).
        if result.status == "completed" and _main():
            save(run, result, started)
        return result
    except torch.cuda.OutOfMemoryError as exc:  # outside a training step: loading, evaluation
        raise BackpropError(
            ErrorCode.RUNTIME_GPU_OOM, f"Out of memory outside a training step: {exc}"
        ) from exc


# 1. Setup: validate against the machine, load data and model, restore a checkpoint ---------------
def setup(config: RunConfig, run_dir: Path, emit: Emit, control: RunControl) -> Run:
    run_id = run_dir.name
    log = get_logger(__name__, run_id=run_id)
    device = pick_device(config)
    check_machine(config, device)  # fail before minutes of loading, not after
    preload_unsloth(config, device, log)
    import torch
    from transformers import set_seed

    from backpropagate.data import collate, prepare_datasets

    emit(Status(status="running", phase="loading_model", message=f"Loading {config.model}"))
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)
    emit(Status(status="running", phase="preparing_data", message=f"Reading {config.data}"))
    data = prepare_datasets(config, tokenizer)
    log.info("data: %d train / %d eval examples", len(data.train), len(data.eval))
    _check_objective(config, data.stats.formats)

    # `auto` is measured on rank 0's GPU and used by every rank: one micro-batch for the group.
    micro_batch, checkpointing = d.broadcast(
        choose_micro_batch(config, model_path, device, log) if _main() else None
    )
    if config.objective != "sft":
        # Unsloth's fast forward skips the logits in training unless asked; the preference losses need them.
        os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")
    set_seed(config.seed)
    loaded = load_model(config, emit, tokenizer=tokenizer, gradient_checkpointing=checkpointing, log=log)
    trainable, total = count_parameters(loaded.model)
    log.info(
        "model %s on %s (%s, %s): %d of %d parameters trainable",
        model_path, device, loaded.backend, loaded.precision, trainable, total,
    )  # fmt: skip

    state = TrainState(micro_batch=micro_batch, grad_accum=config.grad_accum)
    state.effective_batch = micro_batch * config.grad_accum
    steps = total_steps(config, len(data.train), state.effective_batch)
    optimizer = build_optimizer(config, loaded.model)
    scheduler = build_scheduler(config, optimizer, steps)
    fp16 = loaded.device.type == "cuda" and loaded.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    # Packed rows stay apart either through position ids from which transformers builds the mask
    # on the device (transformers backend on GPU), or through a block-diagonal 4D mask built from
    # segment ids after they reach the device (any backend); it must match the attention's dtype.
    on_gpu = loaded.device.type == "cuda"
    attention = "position_ids" if on_gpu and loaded.backend == "transformers" else "segments"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    run = Run(
        config=config,
        run_dir=run_dir,
        run_id=run_id,
        emit=emit,
        control=control,
        loaded=loaded,
        train=list(data.train),
        eval=list(data.eval),
        # Widths rounded up to 64 on GPU: few shapes, so no kernel is compiled again mid-run.
        collate=partial(collate, pad_id=pad_id, attention=attention, pad_to_multiple=64 if on_gpu else 1),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        order=DataOrder(len(data.train), config.seed),
        state=state,
        total_steps=steps,
        faults=FaultInjector(),
    )
    if config.objective != "sft":
        run.preference = PreferenceLoss(config, run.collate, loaded.device, run.mask_dtype, loaded.autocast)
    _restore(run, log)
    if d.is_initialized():
        # Same seed, same weights already; the broadcast makes sure of it (rank 0's are the truth).
        d.broadcast_parameters([p for p in loaded.model.parameters() if p.requires_grad])
    devices = d.gather(str(device))
    emit(
        RunStarted(
            pid=os.getpid(),
            resumed_from_step=run.resumed_from_step,
            config=config.model_dump(mode="json"),
            backend=loaded.backend,
            device=str(device),
            total_steps=steps,
            world_size=_rank_world()[1],
            devices=devices,
        )
    )
    return run


def _rank_world() -> tuple[int, int]:
    """(rank, world size) of the group this process trains in. Outside a process group it is a
    plain run whatever RANK and WORLD_SIZE say (a user's own script under torchrun): it trains on
    every example and writes everything."""
    return (d.rank(), d.world_size()) if d.is_initialized() else (0, 1)


def _main() -> bool:
    """Whether this process evaluates and writes (rank 0, or a plain run)."""
    return _rank_world()[0] == 0


def _check_objective(config: RunConfig, formats: dict[str, str]) -> None:
    """Fail before the model loads when the objective cannot run on this data or method."""
    from backpropagate.data.preference import check_objective_fits

    check_objective_fits(config.objective, formats)
    # The reference of DPO and KTO is the base model with the adapter switched off: full
    # fine-tuning has no adapter to switch off, and a second full copy is what LoRA avoids.
    if config.objective in ("dpo", "kto") and config.method == "full":
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"{config.objective.upper()} on full fine-tuning needs a reference model; use method=lora",
            hint="Use method=lora or qlora, or a reference-free objective (orpo, simpo).",
        )


def _restore(run: Run, log: Any) -> None:
    """Continue from the newest checkpoint that verifies; report (and skip) broken newer ones.

    In a group rank 0 picks the checkpoint (and clears unfinished ones) first; every rank then
    reads that one from the shared run folder.
    """
    loaded = None
    if _main():
        loaded, skipped = ckpt.load_latest_checkpoint(run.ckpt_root)
        for err in skipped:
            log.warning("%s", err.message)
            run.emit(Warning_(code=str(err.code), message=err.message, hint=err.hint))
    chosen = d.broadcast(str(loaded.path) if loaded is not None else None)
    if not _main() and chosen is not None:
        loaded, _ = ckpt.load_latest_checkpoint(run.ckpt_root)
        if loaded is None or str(loaded.path) != chosen:
            raise BackpropError(
                ErrorCode.STATE_CHECKPOINT_INVALID,
                f"Rank {d.rank()} does not find the checkpoint {chosen} that rank 0 resumes from "
                f"(it found {loaded.path if loaded else 'none'}).",
                hint="Every machine of the group must see the same run folder (docs/scaling.md).",
                path=chosen,
            )
    if loaded is None:
        d.seed_rank(run.config.seed, 0)
        return
    ckpt.apply_weights(run.loaded.model, loaded.weights)
    run.optimizer.load_state_dict(loaded.optimizer)
    run.scheduler.load_state_dict(loaded.scheduler["scheduler"])
    if run.scaler is not None and "scaler" in loaded.scheduler:
        run.scaler.load_state_dict(loaded.scheduler["scaler"])
    run.state = TrainState.from_json(loaded.state)
    ckpt.restore_rng(loaded.rng)
    mine = run.state.rank_rng
    rank, world = _rank_world()
    if mine and len(mine) == world:
        d.set_rng_state(mine[rank])
    else:  # a group resuming a one-process checkpoint (or the reverse): fresh streams per rank
        d.seed_rank(run.config.seed, run.state.step)
    run.resumed_from_step = run.state.step
    log.info("resumed from %s (step %d)", loaded.path, run.state.step)


# 2. Fit: optimizer steps until done or stopped -----------------------------------------------------
def fit(run: Run) -> TrainResult:
    config, state, control = run.config, run.state, run.control
    model = run.loaded.model
    model.train()
    run.emit(Status(status="running", phase="training", message=f"{run.total_steps} steps"))

    while state.step < run.total_steps:
        # Between optimizer steps only: a step is never cut in half.
        if d.hold(control):
            return _stop(run)

        step = state.step + 1
        indices, next_position = run.order.take(state.position, _step_size(run, step))
        examples = [run.train[i] for i in indices]
        began = time.perf_counter()
        loss, grad_norm, lr, metrics = _optimizer_step(run, step, examples)
        elapsed = time.perf_counter() - began

        tokens = sum(row_tokens(ex) for ex in examples)
        state.step, state.position = step, next_position
        state.tokens_seen += tokens
        record = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "epoch": round(run.order.epoch_progress(state.position), 4),
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
            "micro_batch": state.micro_batch,
            "grad_accum": state.grad_accum,
            **metrics,
        }
        state.history.append(record)
        if step % config.log_every == 0 or step == run.total_steps:
            run.emit(Step(total_steps=run.total_steps, **record))

        if config.eval_every and step % config.eval_every == 0 and step < run.total_steps:
            _evaluate(run, step)
        if step % config.save_every == 0 and step < run.total_steps:
            _checkpoint(run)

    if run.eval and (not state.eval_history or state.eval_history[-1]["step"] != state.step):
        _evaluate(run, state.step)
    return _result(run, "completed")


def _result(
    run: Run, status: Literal["completed", "cancelled"], checkpoint: Path | None = None
) -> TrainResult:
    state = run.state
    last_eval = state.eval_history[-1] if state.eval_history else {}
    return TrainResult(
        status=status,
        run_id=run.run_id,
        run_dir=run.run_dir,
        step=state.step,
        total_steps=run.total_steps,
        final_loss=state.history[-1]["loss"] if state.history else None,
        eval_loss=last_eval.get("loss"),
        perplexity=last_eval.get("perplexity"),
        checkpoint=checkpoint,
        resumed_from_step=run.resumed_from_step,
        history=list(state.history),
        eval_history=list(state.eval_history),
    )


def _step_size(run: Run, step: int) -> int:
    """Examples in optimizer step ``step``: the effective batch, except that a run measured in
    epochs stops at exactly that many passes (its last step may be smaller)."""
    eff = run.state.effective_batch
    if run.config.steps:
        return eff
    budget = math.ceil(run.config.epochs * len(run.train))
    return max(1, min(eff, budget - (step - 1) * eff))


StepOutcome = tuple[float, float, float, dict[str, float]]  # loss, grad norm, lr, objective metrics


def _optimizer_step(run: Run, step: int, examples: list[dict[str, Any]]) -> StepOutcome:
    """One optimizer step over ``examples``; on OOM (on any rank), shrink the micro-batch and redo
    it from its start (every rank together)."""
    import torch

    state, config = run.state, run.config
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    retries_at_min = 0
    while True:
        try:
            return _accumulate_and_step(run, step, examples)
        except torch.cuda.OutOfMemoryError as exc:
            # Free what the failed attempt held before trying again.
            run.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if not config.oom_recovery:
                raise BackpropError(
                    ErrorCode.RUNTIME_GPU_OOM,
                    f"Out of memory at step {step} with micro-batch {state.micro_batch}: {exc}",
                ) from exc
            old = state.micro_batch
            if old > 1:
                # Every rank computes the same; rank 0's answer is the group's all the same.
                state.micro_batch, state.grad_accum = d.broadcast(
                    (old // 2, math.ceil(state.effective_batch / (old // 2)))
                )
            else:
                retries_at_min += 1
                if retries_at_min > MAX_OOM_RETRIES_AT_MIN:
                    raise BackpropError(
                        ErrorCode.RUNTIME_OOM_RECOVERY_EXHAUSTED,
                        f"Out of memory at step {step} even at micro-batch 1 after "
                        f"{MAX_OOM_RETRIES_AT_MIN} retries (max_seq_len={config.max_seq_len}).",
                    ) from exc
            get_logger(__name__, run_id=run.run_id).warning(
                "out of memory at step %d: micro-batch %d -> %d, accumulation %d",
                step, old, state.micro_batch, state.grad_accum,
            )  # fmt: skip
            run.emit(
                OomRecovered(
                    step=step,
                    old_micro_batch=old,
                    new_micro_batch=state.micro_batch,
                    grad_accum=state.grad_accum,
                    retries=retries_at_min,
                )
            )
            # Same dropout masks on the retry as on the first attempt: the run stays reproducible.
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)


def _accumulate_and_step(run: Run, step: int, examples: list[dict[str, Any]]) -> StepOutcome:
    """One optimizer step over ``examples`` (the whole step's, the same list on every rank)."""
    import torch

    model, optimizer, scaler = run.loaded.model, run.optimizer, run.scaler
    device = run.loaded.device
    if run.preference is None:
        # Every micro-batch's loss is a sum divided by the step's token count (over all ranks):
        # their sum, over the micro-batches of every rank, is the step's mean.
        n_items = torch.tensor(max(1, sum(label_tokens(ex) for ex in examples)), device=device)
    step_loss = torch.zeros((), device=device)
    sums: dict[str, float] = {}  # row-weighted metric sums and their rows, summed over ranks below
    rows: dict[str, int] = {}
    oom: torch.cuda.OutOfMemoryError | None = None
    try:
        # This rank's shard of the step; its gradients accumulate locally, without communication.
        for i, chunk in enumerate(
            split_micro_batches(d.shard(examples, *_rank_world()), run.state.micro_batch)
        ):
            if run.preference is not None:
                # A preference loss is a mean over rows: weighted by its share, the chunks sum to the step's mean.
                out = run.preference(model, chunk)
                loss = out.loss * (len(chunk) / len(examples))
                for key, value in out.metrics.items():
                    if key in STEP_METRICS:
                        sums[key] = sums.get(key, 0.0) + value * len(chunk)
                        rows[key] = rows.get(key, 0) + len(chunk)
            else:
                batch = to_device(run.collate(chunk), device, run.mask_dtype)
                with run.loaded.autocast():
                    # No KV cache in training: it costs memory and hides packed-example boundaries.
                    loss = model(**batch, num_items_in_batch=n_items, use_cache=False).loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.detach().float()
            if i == 0:
                run.faults.maybe_oom(step)
    except torch.cuda.OutOfMemoryError as exc:
        oom = exc
    # The group agrees before any gradient is exchanged: one rank out of memory makes every rank
    # redo the step with a smaller micro-batch, and no rank waits inside a collective meanwhile.
    if d.any_rank(oom is not None):
        raise oom or torch.cuda.OutOfMemoryError("out of memory on another rank of the group")

    params = [p for g in optimizer.param_groups for p in g["params"]]
    d.sum_gradients(params)  # now every rank holds the one-process step's gradient
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    try:
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    except torch.cuda.OutOfMemoryError as exc:
        if d.is_initialized():
            # Some ranks may have stepped: their weights differ now, so the group cannot redo it.
            raise BackpropError(
                ErrorCode.RUNTIME_GPU_OOM,
                f"Out of memory in the optimizer step {step} on rank {d.rank()}: {exc}",
                hint="Resume the run from its last checkpoint with a smaller batch_size or "
                "optimizer='adamw_8bit'.",
            ) from exc
        raise
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # The step's loss and metrics over the whole group, in one collective.
    n = len(STEP_METRICS)
    totals = d.sum_each(
        [float(step_loss), *(sums.get(k, 0.0) for k in STEP_METRICS), *(rows.get(k, 0) for k in STEP_METRICS)]
    )
    metrics = {k: totals[1 + j] / totals[1 + n + j] for j, k in enumerate(STEP_METRICS) if totals[1 + n + j]}
    return totals[0], float(grad_norm), float(lr), metrics


def _evaluate(run: Run, step: int) -> None:
    """Evaluate on the held-out split (rank 0; the others wait for its result); a failure is
    reported and training goes on."""
    if not run.eval:
        return
    entry = d.broadcast(_evaluate_here(run, step) if _main() else None)
    if entry is not None:  # every rank keeps the same history: it decides the final evaluation
        run.state.eval_history.append(entry)
        run.emit(Eval(**entry))


def _evaluate_here(run: Run, step: int) -> dict[str, Any] | None:
    metrics: dict[str, float] = {}
    try:
        run.faults.maybe_fail_eval(step)
        if run.preference is not None:
            ppl = None  # a preference loss is not a token likelihood
            loss, metrics = evaluate_preference(
                run.loaded.model, run.eval, run.preference, batch_size=run.state.micro_batch
            )
        else:
            loss, ppl = evaluate(
                run.loaded.model,
                run.eval,
                run.collate,
                batch_size=run.state.micro_batch,
                device=run.loaded.device,
                autocast=run.loaded.autocast,
                mask_dtype=run.mask_dtype,
            )
    except Exception as exc:
        if _is_oom(exc):
            raise
        message = f"Evaluation at step {step} failed ({type(exc).__name__}: {exc}); training continues"
        get_logger(__name__, run_id=run.run_id).warning(message)
        run.emit(Warning_(code=str(ErrorCode.RUNTIME_TRAINING_FAILED), message=message))
        return None
    finally:
        # evaluate() restores train mode itself; this also covers a failure before it started.
        run.loaded.model.train()
    return {"step": step, "loss": loss, "perplexity": ppl, **metrics}


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _checkpoint(run: Run) -> ckpt.SavedCheckpoint:
    """Write a checkpoint (rank 0, with every rank's RNG); every rank returns once it is written,
    so none runs ahead of a checkpoint it may have to resume from."""
    state = run.state
    if d.is_initialized():
        state.rank_rng = d.gather(d.rng_state())
    saved = _write_checkpoint(run) if _main() else None
    return d.broadcast(saved)


def _write_checkpoint(run: Run) -> ckpt.SavedCheckpoint:
    state = run.state
    last_eval = state.eval_history[-1] if state.eval_history else None
    eval_loss = last_eval["loss"] if last_eval and last_eval["step"] == state.step else None
    saved = ckpt.save_checkpoint(
        run.ckpt_root,
        step=state.step,
        model=run.loaded.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        scaler=run.scaler,
        state=state.to_json(run.run_id, run.config.seed),
        eval_loss=eval_loss,
        keep=run.config.keep_checkpoints,
    )
    run.emit(Checkpoint(step=saved.step, path=str(saved.path), bytes=saved.bytes, best=saved.best))
    return saved


def _stop(run: Run) -> TrainResult:
    """A stop request: checkpoint (unless nothing was trained yet), report cancelled, return."""
    saved = _checkpoint(run) if run.state.step > 0 else None
    path = saved.path if saved else None
    run.emit(Cancelled(step=run.state.step, checkpoint=str(path) if path else None))
    return _result(run, "cancelled", path)


# 3. Save: the adapter (or full model), tokenizer and metrics ---------------------------------------
def save(run: Run, result: TrainResult, started: float) -> None:
    import torch

    run.emit(Status(status="running", phase="saving", message="Writing the adapter"))
    out = Path(run.config.output_dir).expanduser() if run.config.output_dir else run.run_dir / "adapter"
    out.mkdir(parents=True, exist_ok=True)
    run.loaded.model.save_pretrained(out)
    run.loaded.tokenizer.save_pretrained(out)
    runtime = time.time() - started
    trainable, total = count_parameters(run.loaded.model)
    metrics: dict[str, Any] = {
        "final_loss": result.final_loss,
        "eval_loss": result.eval_loss,
        "perplexity": result.perplexity,
        "steps": result.step,
        "runtime_s": round(runtime, 3),
        "tokens": run.state.tokens_seen,
        "tokens_per_s": _mean_rate(result.history),
        "micro_batch": run.state.micro_batch,
        "grad_accum": run.state.grad_accum,
        "trainable_params": trainable,
        "total_params": total,
    }
    if run.loaded.device.type == "cuda":
        metrics["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(run.loaded.device) / 2**20, 1)
    info = {
        "run_id": run.run_id,
        "backend": run.loaded.backend,
        "device": str(run.loaded.device),
        "precision": run.loaded.precision,
        "liger": run.loaded.liger,
        "gradient_checkpointing": run.loaded.gradient_checkpointing,
        "model": run.config.model,
        "adapter_path": str(out),
        **metrics,
    }
    ckpt.write_json_atomic(run.run_dir / "metrics.json", info)
    result.adapter_path = out
    result.metrics = metrics
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and v is not None}
    run.emit(
        Completed(
            step=result.step,
            final_loss=result.final_loss,
            eval_loss=result.eval_loss,
            adapter_path=str(out),
            runtime_s=round(runtime, 3),
            metrics={k: v for k, v in numeric.items() if math.isfinite(v)},
        )
    )


def _mean_rate(history: list[dict[str, Any]]) -> float | None:
    rates = [h["tokens_per_s"] for h in history if h.get("tokens_per_s")]
    # The first step pays for warm-up (allocator, kernel selection); leave it out when we can.
    rates = rates[1:] if len(rates) > 2 else rates
    return round(sum(rates) / len(rates), 1) if rates else None


def _start_monitor(config: RunConfig, emit: Emit, control: RunControl) -> Any:
    from backpropagate.training.monitor import start_monitor

    return start_monitor(config, emit, control)


# The worker joins torchrun's process group before calling us (docs/scaling.md).
run_training.data_parallel = True  # type: ignore[attr-defined]

__all__ = ["run_training", "TrainResult", "TrainState"]
