"""`backprop train`: fine-tune in this process, with a progress bar on stderr and the result on stdout."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import typer

from backpropagate.errors import BackpropError, ErrorCode

# A first run on a demo model should show the loss falling within seconds on any CPU.
DEMO_DEFAULTS: dict[str, Any] = {"steps": 30, "batch_size": 1, "grad_accum": 1, "lr": 1e-3}


def _batch_size(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        return text  # RunConfig reports it with the other problems


def _modules(text: str | None) -> str | list[str] | None:
    if text is None or text == "all-linear":
        return text
    return [part.strip() for part in text.split(",") if part.strip()]


def build_config(options: dict[str, Any]) -> Any:
    """A RunConfig from the options the user gave (None = not given, so presets and defaults apply)."""
    from backpropagate.config import RunConfig

    fields = {k: v for k, v in options.items() if v is not None}
    for key in ("model", "data", "eval_data"):  # the saved config must work from any directory
        if key == "model" and fields.get(key, "").startswith("demo"):
            continue  # demo names win over a folder of the same name, as in resolve_model
        if key in fields and Path(fields[key]).expanduser().exists():
            fields[key] = str(Path(fields[key]).expanduser().resolve())
    model = fields.get("model", "demo")
    if model.startswith("demo") and "steps" not in fields and "epochs" not in fields:
        for key, value in DEMO_DEFAULTS.items():
            if key not in fields and not (key == "lr" and "preset" in fields):
                fields[key] = value
    return RunConfig.parse(fields)


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        model: str = typer.Option(None, "--model", "-m", help="`demo`, a local folder or a hub id."),
        data: str = typer.Option(None, "--data", "-d", help="Training data: file, folder or hub id."),
        steps: int = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
        epochs: float = typer.Option(None, help="Passes over the data."),
        batch_size: str = typer.Option(None, "--batch-size", help="Micro-batch per device, or `auto`."),
        grad_accum: int = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
        lr: float = typer.Option(None, help="Peak learning rate."),
        max_seq_len: int = typer.Option(None, "--max-seq-len", help="Longest sequence in tokens."),
        lora_r: int = typer.Option(None, "--lora-r", help="LoRA rank."),
        lora_alpha: float = typer.Option(None, "--lora-alpha", help="LoRA alpha."),
        method: str = typer.Option(None, help="lora, qlora (GPU) or full."),
        preset: str = typer.Option(None, help="fast, balanced or quality."),
        output: str = typer.Option(None, "--output", "-o", help="Where the adapter goes."),
        resume: str = typer.Option(None, "--resume", help="Continue run RUN_ID from its last checkpoint."),
        seed: int = typer.Option(None, help="Seed for data order and initialisation."),
        eval_fraction: float = typer.Option(None, "--eval-fraction", help="Held-out share of rows."),
        eval_every: int = typer.Option(None, "--eval-every", help="Evaluate every N steps."),
        save_every: int = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
        packing: bool = typer.Option(None, "--packing/--no-packing", help="Pack short examples."),
        device: str = typer.Option(None, help="auto, cpu or cuda."),
        backend: str = typer.Option(None, help="auto, unsloth or transformers."),
        name: str = typer.Option(None, help="A label for the run."),
        eval_data: str = typer.Option(None, "--eval-data", help="Separate evaluation data."),
        data_format: str = typer.Option(None, "--data-format", help="auto, sharegpt, openai, alpaca, text."),
        skip_bad_rows: bool = typer.Option(None, "--skip-bad-rows", help="Skip and count malformed rows."),
        train_on: str = typer.Option(None, "--train-on", help="responses (default) or all tokens."),
        lora_dropout: float = typer.Option(None, "--lora-dropout", help="Dropout on the LoRA path."),
        target_modules: str = typer.Option(
            None, "--target-modules", help="`all-linear` or comma-separated module names."
        ),
        lr_scheduler: str = typer.Option(None, "--lr-scheduler", help="cosine, linear or constant."),
        warmup_ratio: float = typer.Option(None, "--warmup-ratio", help="Share of steps warming up."),
        precision: str = typer.Option(None, help="auto, bf16, fp16 or fp32."),
        keep_checkpoints: int = typer.Option(None, "--keep-checkpoints", help="Checkpoints kept (+ best)."),
        config_file: Path = typer.Option(None, "--config", help="A run configuration (JSON) to start from."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    ) -> None:
        """Fine-tune a model on your data; the adapter lands in the run folder (or --output).

        With a demo model and neither --steps nor --epochs, the run is 30 short steps
        (micro-batch 1, lr 1e-3) so that a first try finishes in seconds on a CPU.
        --config FILE reads a saved run configuration (JSON); flags given override it.
        """
        options = {
            "model": model, "data": data, "steps": steps, "epochs": epochs,
            "batch_size": _batch_size(batch_size), "grad_accum": grad_accum, "lr": lr,
            "max_seq_len": max_seq_len, "lora_r": lora_r, "lora_alpha": lora_alpha, "method": method,
            "preset": preset, "output_dir": output, "seed": seed, "eval_fraction": eval_fraction,
            "eval_every": eval_every, "save_every": save_every, "packing": packing, "device": device,
            "backend": backend, "name": name, "eval_data": eval_data, "data_format": data_format,
            "skip_bad_rows": skip_bad_rows, "train_on": train_on, "lora_dropout": lora_dropout,
            "target_modules": _modules(target_modules), "lr_scheduler": lr_scheduler,
            "warmup_ratio": warmup_ratio, "precision": precision, "keep_checkpoints": keep_checkpoints,
        }  # fmt: skip
        if config_file is not None:
            try:
                base = json.loads(config_file.read_text())
            except (OSError, ValueError) as exc:
                raise BackpropError(
                    ErrorCode.CONFIG_INVALID, f"Cannot read --config {config_file}: {exc}"
                ) from None
            options = {**base, **{k: v for k, v in options.items() if v is not None}}
        config, run_dir = _config_and_run_dir(options, resume)
        result = _run(config, run_dir)
        if as_json:
            print(json.dumps(result.to_dict(), default=str))
        elif result.status == "cancelled":
            print(f"stopped at step {result.step}; resume with: backprop train --resume {result.run_id}")
            raise typer.Exit(130)  # the shell's convention for "interrupted by Ctrl-C"
        else:
            loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
            evl = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
            print(f"run {result.run_id}: {result.step} steps, loss {loss}{evl}")
            print(f"adapter: {result.adapter_path}")


def _config_and_run_dir(options: dict[str, Any], resume: str | None) -> tuple[Any, Path]:
    from backpropagate.config import RunConfig
    from backpropagate.settings import get_settings
    from backpropagate.training.run_ids import new_run_id

    runs = get_settings().runs_dir
    if resume:
        run_dir = runs / resume
        if Path(resume).name != resume or not (run_dir / "config.json").is_file():
            raise BackpropError(ErrorCode.STATE_RUN_NOT_FOUND, f"No run '{resume}' under {runs}.")
        config = RunConfig.load(run_dir / "config.json")
        changed = {k: v for k, v in options.items() if v is not None and k in ("steps", "output_dir")}
        if changed:  # only what does not change the run's trajectory so far
            config = RunConfig.parse({**config.model_dump(), **changed})
        return config, run_dir
    if options.get("data") is None:
        raise BackpropError(ErrorCode.CONFIG_INVALID, "Invalid run configuration: data: --data is required.")
    config = build_config(options)
    run_dir = runs / new_run_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")
    return config, run_dir


def _run(config: Any, run_dir: Path) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from backpropagate.events import EventLog
    from backpropagate.training import run_training
    from backpropagate.training.control import RunControl

    _quiet_libraries()
    console = Console(stderr=True)
    control = RunControl()

    def on_sigint(signum: int, frame: Any) -> None:
        if control.stop_requested:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        console.print("stopping after this step (Ctrl-C again to abort)...")
        control.request_stop("user")

    previous = signal.signal(signal.SIGINT, on_sigint)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("loading", total=None, info="", steps="")
    console.print(f"run {run_dir.name} in {run_dir}")
    try:
        with progress, EventLog(run_dir / "events.jsonl", run_dir.name) as events:

            def emit(event: Any) -> None:
                event = events.append(event)
                kind = event.type
                if kind == "status":
                    progress.update(task, description=event.phase or event.status)
                elif kind == "run_started":
                    done = event.resumed_from_step or 0
                    total_steps = event.total_steps
                    progress.update(
                        task, total=total_steps, completed=done, steps=f"step {done}/{total_steps}"
                    )
                elif kind == "step":
                    tps = f"{event.tokens_per_s:,.0f} tok/s" if event.tokens_per_s else ""
                    progress.update(
                        task,
                        completed=event.step,
                        steps=f"step {event.step}/{event.total_steps}",
                        info=f"loss {event.loss:.4f}  {tps}",
                    )
                elif kind == "eval":
                    progress.console.print(f"eval at step {event.step}: loss {event.loss:.4f}")
                elif kind in ("warning", "oom_recovered"):
                    progress.console.print(f"warning: {_describe(event)}")
                elif kind == "checkpoint":
                    progress.console.print(f"checkpoint: {event.path}", style="dim")

            return run_training(config, run_dir, emit, control)
    finally:
        signal.signal(signal.SIGINT, previous)


def _describe(event: Any) -> str:
    if event.type == "oom_recovered":
        return (
            f"out of memory at step {event.step}: micro-batch {event.old_micro_batch} -> "
            f"{event.new_micro_batch}, accumulation {event.grad_accum}"
        )
    return f"[{event.code}] {event.message}"


def _quiet_libraries() -> None:
    """Our progress bar is the only one: silence the libraries' own bars and chatter on stderr."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    sys.stderr.flush()
