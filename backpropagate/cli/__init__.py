"""The `backprop` command line.

Each module in this package is one command group and exposes ``register(app)``; this file finds
them and wires them up. Modules import torch and friends only inside their commands, so
``backprop --help`` stays instant.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from backpropagate.errors import BackpropError

app = typer.Typer(
    name="backprop",
    help="Fine-tune language models on your own GPU: web app, CLI and Python library.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


@app.callback()
def _root() -> None:
    """Fine-tune language models on your own GPU: web app, CLI and Python library."""


_register_commands()


def report_error(err: BackpropError) -> None:
    """Print a catalogued error the way every command does: ``[CODE] message`` then the hint."""
    print(f"[{err.code}] {err.message}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)


def main() -> None:
    """Console entry point: catalogued errors exit 1 with their code; usage errors exit 2."""
    try:
        app()
    except BackpropError as err:
        report_error(err)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
