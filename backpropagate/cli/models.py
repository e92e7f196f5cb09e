"""`backprop models`: build the tiny offline demo models and list the models stored locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from backpropagate.settings import get_settings

models_app = typer.Typer(
    help="The tiny offline demo models and local model folders.",
    epilog="Example: backprop models make-demo    |    backprop models list",
    no_args_is_help=True,
)


def list_local_models(models_dir: Path | None = None) -> list[dict[str, Any]]:
    """The demo models (built or not) and every other model folder under ``models_dir``."""
    from backpropagate.models.demo import BUILT_NAMES, DEMO_ALIASES, MARKER, is_built

    models_dir = Path(models_dir or get_settings().models_dir)
    rows: list[dict[str, Any]] = []
    for name in BUILT_NAMES:
        path = models_dir / name
        row: dict[str, Any] = {
            "name": name,
            "kind": "demo",
            "aliases": sorted(a for a, target in DEMO_ALIASES.items() if target == name),
            "built": is_built(path),
            "path": str(path),
        }
        if row["built"]:
            info = json.loads((path / MARKER).read_text())
            row["architecture"] = info["spec"]["architecture"]
            row["parameters"] = info["parameters"]
        rows.append(row)
    if models_dir.is_dir():
        for path in sorted(models_dir.iterdir()):
            if path.name in BUILT_NAMES or path.name.startswith(".") or not path.is_dir():
                continue
            if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
                rows.append({"name": path.name, "kind": "local", "built": True, "path": str(path)})
    return rows


@models_app.command("make-demo", epilog="Example: backprop models make-demo")
def make_demo(
    force: bool = typer.Option(False, "--force", help="Rebuild even if the demo models exist."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and training order."),
    as_json: bool = typer.Option(False, "--json", help="Print {name: path} as JSON to stdout."),
) -> None:
    """Build the tiny Llama and Qwen2 demo models (about half a minute on a laptop CPU)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from backpropagate.models.demo import make_demo_models

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"training {name}", total=total)
            bar.update(tasks[name], completed=done)

        paths = make_demo_models(force=force, seed=seed, progress=progress)
    if as_json:
        print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
        return
    for name, path in paths.items():
        print(f"{name}\t{path}")


@models_app.command("list", epilog="Example: backprop models list --json")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON to stdout."),
) -> None:
    """List the demo models (built or not) and the model folders under the models folder."""
    rows = list_local_models()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None)
    for column in ("name", "kind", "status", "path"):
        table.add_column(column)
    for row in rows:
        name = row["name"] + "".join(f" ({alias})" for alias in row.get("aliases", []))
        status = "built" if row["built"] else "not built"
        table.add_row(name, row["kind"], status, row["path"])
    Console().print(table)
    if not all(row["built"] for row in rows):
        print("Build the demo models with `backprop models make-demo` (or use one: it builds on first use).")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
