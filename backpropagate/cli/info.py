"""`backprop info`: versions, accelerator, optional features and where state lives."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
from typing import Any

import typer

from backpropagate.settings import get_settings


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_info() -> dict[str, Any]:
    """Everything `backprop info` and the API's system endpoint report."""
    from backpropagate import __version__
    from backpropagate.gpu import list_gpus

    info: dict[str, Any] = {
        "backpropagate": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "home": str(get_settings().home),
        "packages": {
            name: _version(name)
            for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "gguf", "reflex")
        },
    }
    import torch  # the one heavy import here; `info` is about the machine

    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["gpus"] = [g.model_dump() for g in list_gpus()]
    # find_spec, not import: importing unsloth patches transformers and takes seconds.
    info["unsloth_available"] = importlib.util.find_spec("unsloth") is not None
    info["llama_cpp_available"] = importlib.util.find_spec("llama_cpp") is not None
    return info


def register(app: typer.Typer) -> None:
    @app.command(epilog="Example: backprop info    |    backprop info --json")
    def info(as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout.")) -> None:
        """Show versions, torch/CUDA, GPUs, optional features and the home folder."""
        data = collect_info()
        if as_json:
            print(json.dumps(data, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=False, box=None)
        table.add_row("backpropagate", data["backpropagate"])
        table.add_row("python", f"{data['python']} ({data['platform']})")
        for name, ver in data["packages"].items():
            table.add_row(name, ver or "not installed")
        table.add_row("torch CUDA", data["torch_cuda"] or "none (CPU build)")
        if data["gpus"]:
            for gpu in data["gpus"]:
                mem = f"{gpu['memory_total_mb'] / 1024:.0f} GiB" if gpu.get("memory_total_mb") else "?"
                table.add_row(f"GPU {gpu['index']}", f"{gpu.get('name')} ({mem})")
        else:
            table.add_row("GPU", "no GPU (training runs on the CPU)")
        table.add_row("unsloth", "available" if data["unsloth_available"] else "not installed")
        table.add_row("llama-cpp", "available" if data["llama_cpp_available"] else "not installed")
        table.add_row("home", data["home"])
        Console().print(table)
