"""The `backprop` command line.

Each module in this package is one command group and exposes ``register(app)``; this file finds
them and wires them up. Modules import torch and friends only inside their commands, so
``backprop --help`` stays instant.
"""

from __future__ import annotations

import csv
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

import typer

from backpropagate.errors import BackpropError, ErrorCode, disk_full_error

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


def _print_version(value: bool) -> None:
    if value:
        from backpropagate import __version__

        print(f"backprop {__version__}")
        raise typer.Exit()


@app.callback(
    epilog="Example: backprop train --data examples/quickstart.jsonl    |    backprop --verbose runs list"
)
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Print full tracebacks of unexpected errors."),
) -> None:
    """Fine-tune language models on your own GPU: web app, CLI and Python library."""


# Examples for commands whose modules do not give one (the help test asks every command for one).
FALLBACK_EXAMPLES = {
    "export": "Example: backprop export RUN_ID --format gguf",
    "serve": "Example: backprop serve RUN_ID --port 8080",
    "chat": "Example: backprop chat RUN_ID",
    "push": "Example: backprop push path/to/export --repo user/my-model",
    "ollama": "Example: backprop ollama register RUN_ID --name my-model",
    "ollama register": "Example: backprop ollama register RUN_ID --name my-model",
    "ollama list": "Example: backprop ollama list",
    "ollama rm": "Example: backprop ollama rm my-model",
}


def _add_fallback_examples(typer_app: typer.Typer, prefix: str = "") -> None:
    for command in typer_app.registered_commands:
        name = prefix + (command.name or command.callback.__name__.replace("_", "-"))
        if not command.epilog and name in FALLBACK_EXAMPLES:
            command.epilog = FALLBACK_EXAMPLES[name]
    for group in typer_app.registered_groups:
        name = prefix + (group.name or "")
        if not group.epilog and name in FALLBACK_EXAMPLES:
            group.epilog = FALLBACK_EXAMPLES[name]
        if group.typer_instance is not None:
            _add_fallback_examples(group.typer_instance, name + " ")


def _hide_flag_types() -> None:
    """Flags take no value, so help shows no ``<bool>`` type next to them."""
    from typer.core import TyperOption

    show_type = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag else show_type(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_register_commands()
_add_fallback_examples(app)
_hide_flag_types()


def report_error(err: BackpropError, as_json: bool = False) -> None:
    """Print a catalogued error the way every command does: ``[CODE] message`` then the hint.

    With ``as_json`` it is one JSON object on stdout: ``{"error": {"code", "message", "hint"}}``.
    """
    if as_json:
        print(json.dumps({"error": {"code": str(err.code), "message": err.message, "hint": err.hint}}))
        return
    print(f"[{err.code}] {err.message}", file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)


def _save_traceback(exc: BaseException) -> Path | None:
    """Write the traceback under BACKPROPAGATE_HOME/logs (or the temp folder); None if neither can."""
    import tempfile

    text = "".join(traceback.format_exception(exc))
    name = f"cli-error-{time.strftime('%Y%m%d-%H%M%S')}.log"
    for folder in (_home() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(f"backprop {' '.join(sys.argv[1:])}\n{text}")
            return folder / name
        except OSError:
            continue
    return None


def _home() -> Path:
    try:
        from backpropagate.settings import get_settings

        return get_settings().home
    except Exception:  # noqa: BLE001 - broken settings must not hide the error being reported
        return Path.home() / ".backpropagate"


def to_catalog(exc: Exception) -> BackpropError:
    """The catalogued error for an exception nobody caught; the traceback goes to a log file."""
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    full = disk_full_error(exc)
    if full is not None:
        return full
    if type(exc).__name__ == "NoMatchingPeftModuleError":  # peft's, raised for --target-modules
        return BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"--target-modules: {line}",
            hint="Name linear layers of this model (e.g. q_proj,v_proj), or leave --target-modules unset.",
        )
    if isinstance(exc, csv.Error):
        return BackpropError(ErrorCode.DATASET_PARSE_FAILED, f"CSV could not be parsed: {line}")
    path = _save_traceback(exc)
    where = f"the traceback is in {path}; " if path else ""
    return BackpropError(
        ErrorCode.RUNTIME_INTERNAL,
        f"{type(exc).__name__}: {line}",
        hint=f"{where}rerun with `backprop --verbose ...` to print it, and report it with that log.",
    )


def main() -> None:
    """Console entry point: every error exits 1 with a catalog code; usage errors exit 2."""
    args = sys.argv[1:]
    as_json, verbose = "--json" in args, "--verbose" in args
    try:
        from backpropagate.logs import configure_from_settings

        configure_from_settings()
        app()
    except BackpropError as err:
        if verbose:
            traceback.print_exc()
        report_error(err, as_json)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the door: nothing leaves without a catalog code
        if verbose:
            traceback.print_exc()
        report_error(to_catalog(exc), as_json)
        sys.exit(1)


if __name__ == "__main__":
    main()
