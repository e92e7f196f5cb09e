"""Multi-run: train in successive runs on fresh chunks of the data, merging the adapters between runs.

A schedule around the engine, not a new loop: each sub-run is an ordinary ``run_training`` in
``RUN_DIR/runs/run-NN/`` on its own chunk file, started from the adapter the previous merge left
(``RunConfig.init_adapter``). After it, its adapter is merged into the running one (SLAO or linear,
see :mod:`backpropagate.training.slao`), the merge is validated on the holdout, and the history
is written to ``RUN_DIR/multirun.json`` (atomically) and reported as events on the parent's log.

Data rules: 10% of the rows are held out for validation and never trained on; run ``k`` takes the
``k``-th chunk of ``samples_per_run`` rows of the rest, so chunks never overlap each other or the
holdout. When the pool is used up the schedule says so and stops (or, with ``wrap``, starts a
fresh shuffle of the pool). Without validation (``validate_every_run=False, early_stopping=False``)
nothing is held out and chunks are at most the whole data.

Every step of a run is recorded before the next starts (chunk files, the sub-run's own checkpoints,
``merged/run-NN/``, ``init/run-NN/``, then the manifest), so a crash at run ``k`` resumes at run
``k`` with the merged adapter of runs ``1..k-1``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backpropagate.config import MultiRun, RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import (
    Cancelled,
    Completed,
    Eval,
    EventBase,
    EventLog,
    RunStarted,
    Status,
    Step,
    Warning_,
)
from backpropagate.logs import get_logger
from backpropagate.training.checkpoints import write_json_atomic
from backpropagate.training.control import RunControl
from backpropagate.training.slao import merge_adapters, merge_weight, next_run_init

Emit = Callable[[EventBase], None]
Train = Callable[..., Any]
MANIFEST = "multirun.json"
HOLDOUT_FRACTION = 0.1
ADAPTER_FILE = "adapter_model.safetensors"

log = get_logger(__name__)


# The schedule is a RunConfig field (``multi_run``): the API, the CLI and Python give the same object.
Schedule = MultiRun


def validates(schedule: Schedule) -> bool:
    """Whether merges are validated (and so 10% of the rows held out)."""
    return schedule.validate_every_run or schedule.early_stopping


def check_schedule(schedule: Schedule, config: RunConfig) -> None:
    """What the schedule cannot do with this run configuration, all at once."""
    problems = []
    if config.method == "full":
        problems.append("multi-run merges LoRA adapters: use method='lora' or 'qlora', not 'full'")
    if config.objective != "sft":
        problems.append(f"multi-run trains objective='sft' for now, not {config.objective!r}")
    if problems:
        raise BackpropError(ErrorCode.CONFIG_INVALID, "Invalid multi-run: " + "; ".join(problems))


def make_schedule(**fields: Any) -> Schedule:
    """A schedule from keyword arguments; CONFIG_INVALID lists every bad field."""
    from pydantic import ValidationError

    from backpropagate.config import config_error

    try:
        return Schedule(**fields)
    except ValidationError as exc:
        raise config_error(exc) from None


@dataclass
class ChunkPlan:
    holdout: list[int]
    chunks: list[list[int]]
    pool: int  # rows that may be trained on
    exhausted: bool = False  # fewer chunks than runs: the pool ran out


def plan_chunks(
    n_rows: int,
    num_runs: int,
    samples_per_run: int,
    *,
    seed: int = 0,
    validate: bool = True,
    wrap: bool = False,
    holdout_fraction: float = HOLDOUT_FRACTION,
) -> ChunkPlan:
    """Row indices of the holdout and of each run's chunk: seeded, disjoint, never in the holdout."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    n_hold = 0
    if validate and n_rows >= 2:
        n_hold = min(max(round(n_rows * holdout_fraction), 1), n_rows - 1)
    holdout, pool = order[:n_hold], order[n_hold:]
    size = samples_per_run
    if validate and size > len(pool):
        raise BackpropError(
            ErrorCode.CONFIG_INVALID,
            f"samples_per_run={size} is more than the {len(pool)} rows left for training after holding "
            f"out {n_hold} of {n_rows} for validation. "
            f"Reduce --samples (Python: samples_per_run) below {len(pool)}",
        )
    size = min(size, len(pool))  # without validation the check is skipped: a chunk is at most all rows
    chunks: list[list[int]] = []
    rows, start, rounds = list(pool), 0, 0
    while len(chunks) < num_runs:
        if start + size > len(rows):
            if not wrap:
                break
            rounds += 1
            rows = list(pool)
            random.Random(seed + rounds).shuffle(rows)
            start = 0
        chunks.append(rows[start : start + size])
        start += size
    return ChunkPlan(holdout, chunks, len(pool), exhausted=len(chunks) < num_runs)


@dataclass
class MultiRunResult:
    """What ``Trainer.multi_run`` and ``backprop multi-run --json`` hand back."""

    status: str  # completed | cancelled
    run_id: str
    run_dir: Path
    adapter_path: Path | None
    runs: list[dict[str, Any]] = field(default_factory=list)
    best_val_loss: float | None = None
    best_run: int | None = None
    stopped_early: bool = False
    pool_exhausted: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        out["adapter_path"] = None if self.adapter_path is None else str(self.adapter_path)
        return out


# Rows and adapters on disk -----------------------------------------------------------------------
def _row(example: Any) -> dict[str, Any]:
    """An example as a training row the loader reads back to the same conversation (or text)."""
    if example.kind == "text":
        return {"text": example.text}
    return {"messages": example.sft_messages()}


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    if path.is_file():
        return  # written before a crash: the plan is deterministic, so it is the same file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def _read_state(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / ADAPTER_FILE))


def _write_adapter(folder: Path, state: dict[str, Any], like: Path) -> None:
    """An adapter folder with ``state`` as weights and ``like``'s config and tokenizer, made atomically."""
    from safetensors.torch import save_file

    if folder.is_dir():
        return  # finished before a crash; the manifest had not recorded it yet
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(like, partial, ignore=shutil.ignore_patterns(ADAPTER_FILE, "README.md"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial / ADAPTER_FILE))
    os.replace(partial, folder)


def validation_loss(config: RunConfig, adapter: Path, holdout_file: Path) -> tuple[float, float]:
    """(loss, perplexity) of the base model with ``adapter`` on the holdout rows."""
    return losses_on(config, adapter, [holdout_file])[0]


def losses_on(config: RunConfig, adapter: Path, files: list[Path]) -> list[tuple[float, float]]:
    """(loss, perplexity) of the base model with ``adapter`` on each file's rows (one model load)."""
    from functools import partial

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from backpropagate.data import collate, prepare_datasets
    from backpropagate.training.backends import load_tokenizer, pick_device, resolve_model_path
    from backpropagate.training.evaluation import evaluate

    tokenizer = load_tokenizer(str(adapter))
    device = pick_device(config)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(config.model))
    model = PeftModel.from_pretrained(base, str(adapter)).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for file in files:
        cfg = RunConfig.parse({**config.model_dump(), "data": str(file), "eval_data": None,
                               "eval_fraction": 0.0, "packing": False, "data_format": "auto"})  # fmt: skip
        rows = prepare_datasets(cfg, tokenizer).train
        out.append(evaluate(model, rows, partial(collate, pad_id=pad), batch_size=4, device=device))
    return out


@dataclass
class _Done:
    """A sub-run found completed on disk, standing in for its TrainResult."""

    step: int
    final_loss: float | None
    status: str = "completed"


# The schedule ------------------------------------------------------------------------------------
def run_multi(
    config: RunConfig,
    schedule: Schedule | None,
    run_dir: Path,
    emit: Emit,
    control: RunControl | None = None,
    *,
    train: Train | None = None,
    validate: Callable[[RunConfig, Path, Path], tuple[float, float]] = validation_loss,
) -> MultiRunResult:
    """Run (or resume) the multi-run of ``config`` in ``run_dir``; events go to ``emit``.

    ``schedule`` defaults to ``config.multi_run``; a resumed multi-run keeps the one it started with.
    """
    from backpropagate.data.loading import load_examples

    schedule = schedule or config.multi_run
    if schedule is None:
        raise BackpropError(
            ErrorCode.CONFIG_INVALID, "Invalid multi-run: the run configuration has no multi_run."
        )

    if train is None:
        from backpropagate.training import run_training as train
    check_schedule(schedule, config)
    control = control or RunControl()
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    manifest = _load_manifest(manifest_path, schedule)
    schedule = Schedule(**manifest["schedule"])

    emit(Status(status="running", phase="preparing_data", message=f"Reading {config.data}"))
    loaded = load_examples(config.data, config.data_format, config.skip_bad_rows)
    if not loaded.examples:
        raise BackpropError(ErrorCode.DATASET_EMPTY, f"{config.data} has no rows to train on.")
    plan = plan_chunks(
        len(loaded.examples), schedule.num_runs, schedule.samples_per_run,
        seed=config.seed, validate=validates(schedule), wrap=schedule.wrap,
    )  # fmt: skip
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    holdout_file = data_dir / "holdout.jsonl"
    if plan.holdout:
        _write_rows(holdout_file, [_row(loaded.examples[i]) for i in plan.holdout])
    manifest.update(rows=len(loaded.examples), holdout=len(plan.holdout), pool=plan.pool,
                    chunks=[len(c) for c in plan.chunks])  # fmt: skip
    write_json_atomic(manifest_path, manifest)

    done = [r for r in manifest["runs"] if r["status"] == "merged"]
    total = schedule.steps_per_run * len(plan.chunks)
    emit(RunStarted(pid=os.getpid(), resumed_from_step=schedule.steps_per_run * len(done) or None,
                    config=config.model_dump(mode="json"), total_steps=total))  # fmt: skip
    if plan.exhausted:
        message = (
            f"The {plan.pool} training rows make {len(plan.chunks)} chunks of {schedule.samples_per_run}, "
            f"not {schedule.num_runs}: stopping after run {len(plan.chunks)} (wrap=True reuses the rows)."
        )
        log.warning(message)
        emit(Warning_(code=str(ErrorCode.CONFIG_INVALID_SETTING), message=message))

    for k, chunk in enumerate(plan.chunks, start=1):
        if k <= len(done):
            continue  # merged before a crash or a stop: never trained again
        if _should_stop(manifest, schedule):
            manifest["stopped_early"] = True
            break
        name = f"run-{k:02d}"
        chunk_file = data_dir / f"{name}.jsonl"
        _write_rows(chunk_file, [_row(loaded.examples[i]) for i in chunk])
        init = run_dir / "init" / name if k > 1 else None
        sub_dir = run_dir / "runs" / name
        sub_config = RunConfig.parse({
            **config.model_dump(), "name": f"{config.name or run_dir.name} {name}", "data": str(chunk_file),
            "data_format": "auto", "eval_data": None, "eval_fraction": 0.0, "steps": schedule.steps_per_run,
            "seed": config.seed + k - 1, "output_dir": None, "init_adapter": str(init) if init else None,
            "multi_run": None,
        })  # fmt: skip
        sub_dir.mkdir(parents=True, exist_ok=True)
        sub_config.save(sub_dir / "config.json")
        emit(
            Status(
                status="running", phase="training", message=f"run {k}/{len(plan.chunks)} ({len(chunk)} rows)"
            )
        )
        result = _train_sub_run(train, sub_config, sub_dir, emit, control, k, schedule.steps_per_run, total)
        if result.status != "completed":
            write_json_atomic(manifest_path, manifest)
            emit(Cancelled(step=schedule.steps_per_run * (k - 1) + result.step))
            return _result("cancelled", run_dir, manifest, plan)

        # Merge into the adapter of runs 1..k-1 (kept per run, so redoing a merge never merges twice).
        emit(Status(status="running", phase="merging", message=f"merging run {k} ({schedule.merge})"))
        new_adapter = sub_dir / "adapter"
        previous = _read_state(run_dir / "merged" / f"run-{k - 1:02d}") if k > 1 else None
        merged = merge_adapters(previous, _read_state(new_adapter), k, schedule.merge)
        merged_dir = run_dir / "merged" / name
        merged_dir.parent.mkdir(exist_ok=True)
        _write_adapter(merged_dir, merged, new_adapter)

        val = _validate(validate, config, merged_dir, holdout_file, schedule, plan, emit, k)
        forgetting = _forgetting(config, merged_dir, data_dir, k, emit) if schedule.track_forgetting else None
        if k < len(plan.chunks):
            (run_dir / "init").mkdir(exist_ok=True)
            _write_adapter(
                run_dir / "init" / f"run-{k + 1:02d}", next_run_init(merged, schedule.merge), merged_dir
            )
        entry = {
            "index": k,
            "run_id": name,
            "run_dir": str(sub_dir),
            "lambda": merge_weight(schedule.merge, k),
            "val_loss": val[0] if val else None,
            "val_perplexity": val[1] if val else None,
            "steps": result.step,
            "final_loss": result.final_loss,
            "samples": len(chunk),
            "merged_adapter": str(merged_dir),
            "chunk_loss": forgetting,
            "status": "merged",
            "ts": time.time(),
        }
        manifest["runs"].append(entry)
        _update_best(manifest, entry, schedule)
        write_json_atomic(manifest_path, manifest)
        step = schedule.steps_per_run * k
        if val:
            emit(Eval(step=step, loss=val[0], perplexity=val[1]))
        lam = f"λ={entry['lambda']:.3f}"
        val_text = f", val loss {val[0]:.4f}" if val else ""
        emit(
            Status(
                status="running",
                phase="merged",
                message=f"run {k} merged ({schedule.merge}, {lam}){val_text}",
            )
        )

    out = _result("completed", run_dir, manifest, plan)
    out.adapter_path = _publish_adapter(run_dir, manifest)
    write_json_atomic(manifest_path, manifest)
    last = manifest["runs"][-1] if manifest["runs"] else {}
    emit(Completed(step=schedule.steps_per_run * len(manifest["runs"]), final_loss=last.get("final_loss"),
                   eval_loss=manifest.get("best_val_loss"), adapter_path=str(out.adapter_path)))  # fmt: skip
    return out


def _train_sub_run(
    train: Train,
    config: RunConfig,
    sub_dir: Path,
    emit: Emit,
    control: RunControl,
    k: int,
    per_run: int,
    total: int,
) -> Any:
    """One sub-run with its own event log; its steps reach the parent counted across runs."""
    offset = per_run * (k - 1)
    metrics = sub_dir / "metrics.json"
    if metrics.is_file() and (sub_dir / "adapter" / ADAPTER_FILE).is_file():
        # Trained before a crash that came before its merge was recorded: merge it, do not retrain.
        saved = json.loads(metrics.read_text())
        return _Done(step=saved.get("steps") or per_run, final_loss=saved.get("final_loss"))
    with EventLog(sub_dir / "events.jsonl", sub_dir.name) as events:

        def sub_emit(event: EventBase) -> None:
            events.append(event)
            if isinstance(event, Step):
                data = event.model_dump(exclude={"v", "run_id", "seq", "ts", "type"})
                emit(Step(**{**data, "step": offset + event.step, "total_steps": total,
                             "epoch": round(k - 1 + min(event.step / per_run, 1.0), 4)}))  # fmt: skip
            elif isinstance(event, Warning_):
                emit(event.model_copy(update={"message": f"run {k}: {event.message}"}))

        return train(config, sub_dir, sub_emit, control)


def _validate(
    validate: Callable[[RunConfig, Path, Path], tuple[float, float]],
    config: RunConfig, merged_dir: Path, holdout_file: Path, schedule: Schedule, plan: ChunkPlan, emit: Emit, k: int,
) -> tuple[float, float] | None:  # fmt: skip
    """The merged adapter's holdout loss; a failure is reported and the schedule goes on."""
    if not validates(schedule) or not plan.holdout:
        return None
    emit(Status(status="running", phase="validating", message=f"validating the merge of run {k}"))
    try:
        loss, ppl = validate(config, merged_dir, holdout_file)
    except Exception as exc:  # noqa: BLE001 - validation informs; it must not end the training
        message = f"Validation after run {k} failed ({type(exc).__name__}: {exc}); training continues"
        log.warning(message)
        emit(Warning_(code=str(ErrorCode.RUNTIME_TRAINING_FAILED), message=message))
        return None
    return (loss, ppl) if math.isfinite(loss) else None


def _forgetting(
    config: RunConfig, merged_dir: Path, data_dir: Path, k: int, emit: Emit
) -> dict[str, float] | None:
    """Loss of the merge after run ``k`` on the chunk of every run so far ("run 1's chunk after run 3")."""
    names = [f"run-{j:02d}" for j in range(1, k + 1)]
    try:
        losses = losses_on(config, merged_dir, [data_dir / f"{name}.jsonl" for name in names])
    except Exception as exc:  # noqa: BLE001 - a measurement; training goes on without it
        emit(
            Warning_(
                code=str(ErrorCode.RUNTIME_TRAINING_FAILED),
                message=f"Chunk losses after run {k} failed: {exc}",
            )
        )
        return None
    return {name: loss for name, (loss, _) in zip(names, losses, strict=True)}


def _update_best(manifest: dict[str, Any], entry: dict[str, Any], schedule: Schedule) -> None:
    val = entry["val_loss"]
    best = manifest.get("best_val_loss")
    if val is not None and (best is None or val < best - schedule.min_delta):
        manifest["best_val_loss"], manifest["best_run"] = val, entry["index"]
        manifest["runs_since_best"] = 0
    elif val is not None:
        manifest["runs_since_best"] = manifest.get("runs_since_best", 0) + 1


def _should_stop(manifest: dict[str, Any], schedule: Schedule) -> bool:
    return schedule.early_stopping and manifest.get("runs_since_best", 0) >= schedule.patience


def _publish_adapter(run_dir: Path, manifest: dict[str, Any]) -> Path | None:
    """RUN_DIR/adapter: the merge with the best validation loss (else the last), like any run's adapter."""
    if not manifest["runs"]:
        return None
    pick = manifest.get("best_run") or manifest["runs"][-1]["index"]
    source = run_dir / "merged" / f"run-{pick:02d}"
    target = run_dir / "adapter"
    partial = run_dir / "adapter.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    manifest["adapter"] = {"path": str(target), "from_run": pick}
    return target


def _load_manifest(path: Path, schedule: Schedule) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())  # a resume keeps the schedule it started with
    return {"schedule": schedule.model_dump(), "runs": [], "best_val_loss": None, "best_run": None,
            "runs_since_best": 0, "stopped_early": False}  # fmt: skip


def _result(status: str, run_dir: Path, manifest: dict[str, Any], plan: ChunkPlan) -> MultiRunResult:
    return MultiRunResult(
        status=status,
        run_id=run_dir.name,
        run_dir=run_dir,
        adapter_path=None,
        runs=list(manifest["runs"]),
        best_val_loss=manifest.get("best_val_loss"),
        best_run=manifest.get("best_run"),
        stopped_early=bool(manifest.get("stopped_early")),
        pool_exhausted=plan.exhausted,
    )


def multi_run_in_process(
    config: RunConfig,
    schedule: Schedule,
    run_dir: Path,
    on_event: Callable[[EventBase], None] | None = None,
    control: RunControl | None = None,
    **kwargs: Any,
) -> MultiRunResult:
    """``run_multi`` as a registered run with its own events.jsonl (what `backprop train` does for one run)."""
    from backpropagate.runs.foreground import StoreSync, failed_event

    run_dir = Path(run_dir)
    sync = StoreSync(run_dir.name, config)
    last: dict[str, Any] = {"type": None, "step": None}
    with EventLog(run_dir / "events.jsonl", run_dir.name) as events:

        def emit(event: EventBase) -> None:
            stamped = events.append(event)
            last["type"] = stamped.type  # type: ignore[attr-defined]
            last["step"] = getattr(stamped, "step", None) or last["step"]
            sync.push(stamped)
            if on_event is not None:
                on_event(stamped)

        try:
            return run_multi(config, schedule, run_dir, emit, control, **kwargs)
        except BaseException as exc:
            if last["type"] not in ("completed", "failed", "cancelled"):
                aborted = isinstance(exc, KeyboardInterrupt)
                emit(Cancelled(step=last["step"]) if aborted else failed_event(exc, last["step"]))
            raise
        finally:
            sync.flush()


def start_multi_run(
    config: RunConfig,
    schedule: Schedule,
    *,
    resume: str | None = None,
    on_event: Callable[[EventBase], None] | None = None,
    control: RunControl | None = None,
    **kwargs: Any,
) -> MultiRunResult:
    """A new multi-run under BACKPROPAGATE_HOME/runs/ (or ``resume``: an earlier one's id), trained here."""
    from backpropagate.settings import get_settings
    from backpropagate.training.run_ids import create_run_dir

    runs = get_settings().runs_dir
    if resume:
        run_dir = runs / resume
        if Path(resume).name != resume or not (run_dir / MANIFEST).is_file():
            raise BackpropError(ErrorCode.STATE_RUN_NOT_FOUND, f"No multi-run '{resume}' under {runs}.")
        config = RunConfig.load(run_dir / "config.json")
        schedule = config.multi_run or schedule
    else:
        config = config.model_copy(update={"multi_run": schedule})  # the run's config names its schedule
        # Every check that can fail does, before a folder exists for a run that cannot start.
        from backpropagate.data.loading import load_examples

        check_schedule(schedule, config)
        n_rows = len(load_examples(config.data, config.data_format, config.skip_bad_rows).examples)
        plan_chunks(n_rows, schedule.num_runs, schedule.samples_per_run, seed=config.seed,
                    validate=validates(schedule), wrap=schedule.wrap)  # fmt: skip
        run_dir = create_run_dir(runs)
        config.save(run_dir / "config.json")
    return multi_run_in_process(config, schedule, run_dir, on_event, control, **kwargs)


def engine(train: Train) -> Train:
    """The worker's engine for a run whose config has a ``multi_run`` schedule: the schedule around ``train``."""

    def run(
        config: RunConfig, run_dir: Path, emit: Emit, control: RunControl | None = None
    ) -> MultiRunResult:
        return run_multi(config, config.multi_run, run_dir, emit, control, train=train)

    return run
