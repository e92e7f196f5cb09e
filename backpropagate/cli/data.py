"""`backprop data`: check a data set before training on it."""

from __future__ import annotations

import sys

import typer

data_app = typer.Typer(
    help="Inspect and validate data sets.",
    epilog="Example: backprop data validate train.jsonl",
    no_args_is_help=True,
)

BAR_WIDTH = 40


def _print_report(report) -> None:  # noqa: ANN001 - ValidationReport, imported lazily
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(show_header=False, box=None)
    table.add_row("data", report.path)
    for file, fmt in report.formats.items():
        table.add_row("format", f"{fmt}  ({file})")
    table.add_row("rows", f"{report.rows} usable of {report.total_rows}")
    if report.kinds:
        table.add_row("kinds", ", ".join(f"{k}: {n}" for k, n in report.kinds.items()))
    table.add_row("duplicates", str(report.duplicates))
    if report.token_stats:
        s = report.token_stats
        table.add_row("model", str(report.model))
        table.add_row("tokens", f"{report.total_tokens} total")
        label = "length (chosen)" if report.rejected_token_stats else "length"
        table.add_row(label, f"min {s.min}  mean {s.mean}  p50 {s.p50}  p95 {s.p95}  max {s.max}")
        if r := report.rejected_token_stats:
            table.add_row(
                "length (rejected)", f"min {r.min}  mean {r.mean}  p50 {r.p50}  p95 {r.p95}  max {r.max}"
            )
        table.add_row("over max", f"{report.over_max_len} rows longer than {report.max_seq_len} (truncated)")
    if report.skipped:
        table.add_row("skipped", f"{len(report.skipped)} bad rows")
    console.print(table)
    if report.histogram:
        top = max(b.count for b in report.histogram) or 1
        print("\ntoken length histogram (tokens: rows)")
        for b in report.histogram:
            bar = "#" * round(BAR_WIDTH * b.count / top)
            print(f"  {b.start:>6}-{b.end - 1:<6} {b.count:>6}  {bar}")
    # Plain print: a problem line must never be wrapped or styled, it names a file and line.
    for title, issues in (("skipped rows", report.skipped), ("problems", report.errors)):
        if issues:
            print(f"\n{title}:")
            for issue in issues[:50]:
                print(f"  {issue}")
            if len(issues) > 50:
                print(f"  ... and {len(issues) - 50} more")


def register(app: typer.Typer) -> None:
    @data_app.command(
        "validate",
        epilog="Examples: backprop data validate train.jsonl    |    backprop data validate data/ --model none --json",
    )
    def validate(
        path: str = typer.Argument(..., help="A data file, a folder of them, or a saved data set."),
        model: str = typer.Option("demo", help="Model whose tokenizer counts tokens; `none` to skip."),
        max_seq_len: int = typer.Option(1024, "--max-seq-len", min=16, help="Longest sequence in tokens."),
        data_format: str = typer.Option(
            "auto", "--format", help="auto, sharegpt, openai, alpaca, text, preference or kto."
        ),
        skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Skip and count bad rows."),
        preview: int = typer.Option(5, help="Rows to include in the preview (JSON output)."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON to stdout."),
    ) -> None:
        """Check formats, bad rows and token lengths of a data set; exit 1 if it cannot be trained on."""
        from backpropagate.cli import report_error
        from backpropagate.data.validate import validate_dataset
        from backpropagate.errors import BackpropError

        report = validate_dataset(
            path,
            model=None if model.lower() == "none" else model,
            max_seq_len=max_seq_len,
            data_format=data_format,
            skip_bad_rows=skip_bad_rows,
            preview_rows=preview,
        )
        if as_json:
            print(report.model_dump_json(indent=2))
        else:
            _print_report(report)
        if not report.ok:
            report_error(BackpropError(report.error_code, report.summary()))
            raise typer.Exit(1)

    app.add_typer(data_app, name="data")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(typer.main.get_command(data_app)())
