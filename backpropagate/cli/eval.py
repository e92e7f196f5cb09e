"""`backprop eval`: score a run on held-out data and on a file of prompts, alone or against another model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

EXAMPLES = """Examples:

  backprop eval RUN_ID

  backprop eval RUN_ID --data questions.jsonl --vs base

  backprop eval RUN_ID --data questions.jsonl --vs OTHER_RUN_ID --json
"""

ROWS = (
    ("exact_match", "exact match"),
    ("contains", "contains"),
    ("regex", "regex"),
    ("token_f1", "token F1"),
    ("loss", "loss"),
    ("perplexity", "perplexity"),
)


def register(app: typer.Typer) -> None:
    @app.command("eval", epilog=EXAMPLES)
    def eval_command(
        run_id: str = typer.Argument(
            ..., help="The run to evaluate (an id from `backprop runs list`, or its folder)."
        ),
        data: Path | None = typer.Option(
            None,
            "--data",
            "-d",
            help='JSONL of {"prompt", "expected"} rows (optional "regex") to generate on.',
        ),
        vs: str | None = typer.Option(
            None, "--vs", help="Compare with another run id, or `base` (no adapter)."
        ),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, max=4096, help="Longest answer."),
        seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap intervals (and of generation)."),
        as_json: bool = typer.Option(
            False, "--json", help='Print one JSON object {"run", "vs", "diff", "examples"}.'
        ),
    ) -> None:
        """Held-out loss and perplexity; with --data, greedy answers scored by exact match, contains, regex
        and token F1, each with a bootstrap 95% interval. With --vs, a side-by-side table with the
        difference and whether its paired interval excludes 0. Results are kept in RUN_DIR/evals/.
        """
        from backpropagate.evaluation.runner import evaluate_run

        _quiet_libraries()

        def progress(stage: str, done: int, total: int) -> None:
            if not as_json and sys.stderr.isatty():
                print(f"\r{stage} {done}/{total}", end="", file=sys.stderr, flush=True)

        result = evaluate_run(
            run_id, data=data, vs=vs, max_new_tokens=max_new_tokens, seed=seed, progress=progress
        )
        if as_json:
            print(json.dumps(result))
            return
        if sys.stderr.isatty():
            print(file=sys.stderr)
        print_result(result)


def _quiet_libraries() -> None:
    """transformers' weight-loading bars and deprecation notes say nothing about the evaluation."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _value(metric: str, value: Any) -> str:
    if value is None:
        return "-"
    if metric in ("loss", "perplexity"):
        return f"{value:.3f}"
    return f"{value:.1%}"


def _interval(metric: str, ci: list[float] | None) -> str:
    return "" if not ci else f" [{_value(metric, ci[0])}, {_value(metric, ci[1])}]"


def print_result(result: dict[str, Any]) -> None:
    """The table a person reads: one row a metric, each value with its 95% interval."""
    from rich.console import Console
    from rich.table import Table

    run, vs, diff = result["run"], result["vs"], result.get("diff") or {}
    console = Console(width=None if sys.stdout.isatty() else 160)
    rows = f" ({run['n']} examples)" if run["n"] else ""
    title = f"{result['run_id']}" + (f" vs {result['vs_id']}" if vs else "") + rows
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("this run")
    if vs:
        for col in ("vs", "difference [95% CI]", "interval excludes 0"):
            table.add_column(col)
    for key, label in ROWS:
        if run.get(key) is None and (not vs or vs.get(key) is None):
            continue
        cells = [label, _value(key, run.get(key)) + _interval(key, run.get(f"{key}_ci"))]
        if vs:
            cells.append(_value(key, vs.get(key)) + _interval(key, vs.get(f"{key}_ci")))
            d = diff.get(key)
            if d:
                sign = "+" if d["diff"] >= 0 else ""
                cells.append(f"{sign}{_value(key, d['diff'])}{_interval(key, d['diff_ci'])}")
                cells.append(f"yes ({d['verdict']})" if d["excludes_zero"] else "no")
            else:
                cells += ["", ""]
        table.add_row(*cells)
    console.print(table)
    if vs and diff:
        console.print(verdict_line(result))
    if result.get("path"):
        console.print(f"saved: {result['path']}")


def verdict_line(result: dict[str, Any]) -> str:
    """One sentence: better, worse or not distinguishable from the other model, and on what."""
    from backpropagate.runs.evals import verdict

    return f"verdict: {verdict(result)}"
