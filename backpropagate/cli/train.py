"""`backprop train`: fine-tune in this process, with a progress bar on stderr and the result on stdout.

Its options are generated from RunConfig: every field is a `--field-name` option with the field's
description as help and its Literal values as choices. CLI-only conveniences (short names, the
`--output` spelling, comma-separated lists) are declared once in ``OPTION_NAMES`` and ``_from_text``.
"""

from __future__ import annotations

import inspect
import json
import signal
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode

# CLI spellings that differ from `--field-name`, and short names (one place, shared by help and docs).
OPTION_NAMES: dict[str, tuple[str, ...]] = {
    "model": ("--model", "-m"),
    "data": ("--data", "-d"),
    "output_dir": ("--output", "-o"),
}
# Shown on the help page: options people reach for first.
EXAMPLES = """Examples:

  backprop train --model demo --data examples/quickstart.jsonl

  backprop train -m Qwen/Qwen2.5-0.5B-Instruct -d chats.jsonl --steps 200 --batch-size auto

  backprop train --resume RUN_ID
"""


def option_name(field: str) -> str:
    """The long option of a RunConfig field: ``lora_r`` -> ``--lora-r``."""
    return OPTION_NAMES.get(field, ("--" + field.replace("_", "-"),))[0]


def _members(annotation: Any) -> list[Any]:
    """The non-None members of a (possibly Optional/union) annotation."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [arg for arg in get_args(annotation) if arg is not type(None)]
    return [annotation]


def _literal_values(annotation: Any) -> list[Any]:
    values: list[Any] = []
    for member in _members(annotation):
        if get_origin(member) is Literal:
            values.extend(get_args(member))
    return values


def _cli_type(annotation: Any) -> Any:
    """The type typer parses a field as: plain types as they are, every mixed union as text."""
    members = _members(annotation)
    if len(members) == 1:
        only = members[0]
        if only in (bool, int, float, str) or get_origin(only) is Literal:
            return only
    return str  # e.g. `int | "auto"`, `list[str] | "all-linear"`: RunConfig parses the text


def _from_text(field: str, value: Any) -> Any:
    """Turn a mixed-union option's text into what RunConfig expects (lists from commas)."""
    if not isinstance(value, str):
        return value
    annotation = RunConfig.model_fields[field].annotation
    if value in _literal_values(annotation):
        return value
    if any(get_origin(m) is list for m in _members(annotation)):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value  # "2" for `int | "auto"`: pydantic's lax mode makes it an int


def _metavar(annotation: Any) -> str | None:
    """``auto|INT``, ``all-linear|NAME,...``, ``auto|true|false`` for mixed unions; None otherwise."""
    if _cli_type(annotation) is not str or len(_members(annotation)) == 1:
        return None
    words = [str(v) for v in _literal_values(annotation)]
    for member in _members(annotation):
        if member is bool:
            words += ["true", "false"]
        elif member is int:
            words.append("INT")
        elif get_origin(member) is list:
            words.append("NAME,...")
    return "|".join(words)


def _help(field: str) -> str:
    info = RunConfig.model_fields[field]
    text = (info.description or "").replace("`", "")
    if not info.is_required() and info.default is not None:
        text += f" (default: {info.default})"
    return text


def config_parameters() -> list[inspect.Parameter]:
    """One typer option per RunConfig field, all defaulting to None (= not given)."""
    params = []
    for field, info in RunConfig.model_fields.items():
        kind = _cli_type(info.annotation)
        names = OPTION_NAMES.get(field, (option_name(field),))
        if kind is bool:
            names = (f"{names[0]}/--no-{names[0][2:]}", *names[1:])
        panel = "Run configuration"
        option = typer.Option(
            *names, help=_help(field), metavar=_metavar(info.annotation), show_default=False,
            rich_help_panel=panel,
        )
        params.append(
            inspect.Parameter(
                field, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
            )
        )
    return params


def build_config(options: dict[str, Any]) -> RunConfig:
    """A RunConfig from the options the user gave (None = not given, so presets and defaults apply)."""
    fields = {k: _from_text(k, v) for k, v in options.items() if v is not None}
    for key in ("model", "data", "eval_data"):  # the saved config must work from any directory
        if key == "model" and str(fields.get(key, "")).startswith("demo"):
            continue  # demo names win over a folder of the same name, as in resolve_model
        if key in fields and Path(fields[key]).expanduser().exists():
            fields[key] = str(Path(fields[key]).expanduser().resolve())
    return RunConfig.parse(fields)


def _train(
    resume: str | None, config_file: Path | None, as_json: bool, options: dict[str, Any]
) -> None:
    if config_file is not None:
        try:
            base = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise BackpropError(ErrorCode.CONFIG_INVALID, f"Cannot read --config {config_file}: {exc}") from None
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


def train(
    resume: str | None = None, config_file: Path | None = None, as_json: bool = False, **options: Any
) -> None:
    """Fine-tune a model on your data; the adapter lands in the run folder (or --output).

    Every run configuration field is an option (docs/configuration.md). With a demo model the unset batch size, accumulation and learning rate are sized for a CPU, and without --steps or --epochs the run is 150 steps, so a first try visibly learns in seconds.

    --config FILE reads a saved run configuration (JSON); flags given override it.
    """
    _train(resume, config_file, as_json, options)


_EXTRA = [
    inspect.Parameter(
        "resume", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[str | None, typer.Option("--resume", help="Continue run RUN_ID from its last checkpoint.")],
    ),
    inspect.Parameter(
        "config_file", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Path | None, typer.Option("--config", help="A run configuration (JSON) to start from.")],
    ),
    inspect.Parameter(
        "as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
        annotation=Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")],
    ),
]  # fmt: skip
train.__signature__ = inspect.Signature(config_parameters() + _EXTRA)  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    app.command(epilog=EXAMPLES)(train)


def _config_and_run_dir(options: dict[str, Any], resume: str | None) -> tuple[Any, Path]:
    from backpropagate.config import RunConfig
    from backpropagate.settings import get_settings
    from backpropagate.training.run_ids import create_run_dir

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
    run_dir = create_run_dir(runs)
    config.save(run_dir / "config.json")
    return config, run_dir


def _run(config: Any, run_dir: Path) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from backpropagate.runs.foreground import train_in_process
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
        with progress:

            def show(event: Any) -> None:
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

            from backpropagate.runs.group import processes_for, train_group

            ranks = processes_for(config)
            if ranks > 1:  # one rank per GPU (CPU ranks under BACKPROPAGATE_DIST_BACKEND=gloo)
                return train_group(config, run_dir, ranks, show, control)
            return train_in_process(config, run_dir, show, control)
    except KeyboardInterrupt:
        console.print(f"aborted; resume from the last checkpoint with: backprop train --resume {run_dir.name}")
        raise
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
