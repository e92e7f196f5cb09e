"""`backprop multi-run`: successive runs on fresh chunks of the data, their adapters merged between runs."""

from __future__ import annotations

import inspect
import json
import signal
from typing import Annotated, Any

import typer

from backpropagate.errors import BackpropError, ErrorCode

EXAMPLES = """Examples:

  backprop multi-run --model demo --data examples/quickstart.jsonl --runs 2 --steps 5 --samples 3

  backprop multi-run -m demo -d chats.jsonl --runs 5 --steps 50 --samples 200 --merge linear --json

  backprop multi-run --resume RUN_ID
"""
# RunConfig fields the schedule sets for each sub-run: not options here.
SCHEDULED = {"steps", "epochs", "eval_data", "eval_fraction", "init_adapter", "output_dir", "multi_run"}


def multi_run(
    runs: int | None = None,
    steps: int | None = None,
    samples: int | None = None,
    merge: str = "slao",
    validate: bool = True,
    early_stopping: bool = True,
    patience: int = 2,
    wrap: bool = False,
    track_forgetting: bool = False,
    resume: str | None = None,
    as_json: bool = False,
    **options: Any,
) -> None:
    """Train --runs runs of --steps steps, each on --samples new rows, merging the adapters after each run.

    10% of the rows are held out to validate every merge (never trained on); chunks never overlap. SLAO merges B towards each new run with weight 1/sqrt(i) and starts the next run's A from an orthogonal basis of the last; `linear` averages the adapters. The run folder holds each sub-run (runs/run-NN/), each merge, and multirun.json with the history. Other options are the run configuration fields of `backprop train`.
    """
    from backpropagate.cli.train import _quiet_libraries, build_config
    from backpropagate.training.control import RunControl
    from backpropagate.training.multirun import make_schedule, start_multi_run

    if merge not in ("slao", "linear"):
        raise BackpropError(ErrorCode.CONFIG_INVALID, f"--merge must be slao or linear, not {merge!r}.")
    config = schedule = None
    if resume is None:
        missing = [f for f, v in (("--data", options.get("data")), ("--runs", runs), ("--steps", steps),
                                  ("--samples", samples)) if v is None]  # fmt: skip
        if missing:
            raise BackpropError(
                ErrorCode.CONFIG_INVALID, f"Invalid multi-run: {', '.join(missing)} required."
            )
        config = build_config(options)
    schedule = make_schedule(
        num_runs=runs or 1, steps_per_run=steps or 1, samples_per_run=samples or 1, merge=merge,  # type: ignore[arg-type]
        validate_every_run=validate, early_stopping=early_stopping, patience=patience, wrap=wrap,
        track_forgetting=track_forgetting,
    )  # fmt: skip
    _quiet_libraries()
    control = RunControl()

    def on_sigint(signum: int, frame: Any) -> None:
        if control.stop_requested:
            raise KeyboardInterrupt
        typer.echo("stopping after this step (Ctrl-C again to abort)...", err=True)
        control.request_stop("user")

    def show(event: Any) -> None:
        if as_json:
            return
        if event.type == "status" and event.phase in ("training", "merged"):
            typer.echo(event.message, err=True)
        elif event.type == "step" and (event.step % 10 == 0 or event.step == event.total_steps):
            typer.echo(f"  step {event.step}/{event.total_steps} loss {event.loss:.4f}", err=True)
        elif event.type == "warning":
            typer.echo(f"warning: [{event.code}] {event.message}", err=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        if resume is not None:
            from backpropagate.config import RunConfig

            config = RunConfig(data="(resumed)")  # replaced by the run's saved config
        result = start_multi_run(config, schedule, resume=resume, on_event=show, control=control)  # type: ignore[arg-type]
    finally:
        signal.signal(signal.SIGINT, previous)
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
        return
    for entry in result.runs:
        val = f"{entry['val_loss']:.4f}" if entry["val_loss"] is not None else "-"
        chunks = entry.get("chunk_loss") or {}
        earlier = "".join(f", {name} {loss:.4f}" for name, loss in chunks.items())
        print(
            f"run {entry['index']}: λ={entry['lambda']:.3f} loss {entry['final_loss']:.4f} val loss {val}{earlier}"
        )
    if result.status == "cancelled":
        print(f"stopped; resume with: backprop multi-run --resume {result.run_id}")
        raise typer.Exit(130)
    note = " (stopped early)" if result.stopped_early else ""
    print(f"multi-run {result.run_id}: {len(result.runs)} runs merged{note}")
    print(f"adapter: {result.adapter_path}")


def _parameters() -> list[inspect.Parameter]:
    from backpropagate.cli.train import config_parameters

    def opt(name: str, kind: Any, default: Any, *flags: str, help: str) -> inspect.Parameter:
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default,
            annotation=Annotated[kind, typer.Option(*flags, help=help, rich_help_panel="Schedule")],
        )  # fmt: skip

    own = [
        opt("runs", int | None, None, "--runs", help="Number of runs."),
        opt("steps", int | None, None, "--steps", help="Optimizer steps per run."),
        opt("samples", int | None, None, "--samples", help="New rows each run trains on."),
        opt("merge", str, "slao", "--merge", help="slao (default) or linear."),
        opt(
            "validate",
            bool,
            True,
            "--validate/--no-validate",
            help="Validate every merge on the 10% holdout.",
        ),
        opt(
            "early_stopping",
            bool,
            True,
            "--early-stopping/--no-early-stopping",
            help="Stop when --patience runs in a row do not lower the validation loss.",
        ),  # fmt: skip
        opt("patience", int, 2, "--patience", help="Runs without improvement before stopping early."),
        opt("wrap", bool, False, "--wrap", help="Once every row was trained on, reshuffle and go on."),
        opt(
            "track_forgetting",
            bool,
            False,
            "--track-forgetting",
            help="After each merge, measure the loss on every earlier run's chunk.",
        ),  # fmt: skip
        opt("resume", str | None, None, "--resume", help="Continue multi-run RUN_ID where it stopped."),
        opt("as_json", bool, False, "--json", help="Print the result as JSON on stdout."),
    ]
    return own + [p for p in config_parameters() if p.name not in SCHEDULED]


multi_run.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    app.command("multi-run", epilog=EXAMPLES)(multi_run)


__all__ = ["multi_run", "register"]
