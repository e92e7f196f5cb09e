"""`backprop estimate-vram`: the memory estimate the New run page shows, and what fits on common cards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from backpropagate.errors import BackpropError, ErrorCode

# Usable share of a card's memory: the driver, the display and the allocator keep the rest.
USABLE = 0.92
LARGEST_MICRO_BATCH = 64


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float


CARDS = [
    Card("RTX 3060", 12),
    Card("RTX 4080 / 5080", 16),
    Card("RTX 3090 / 4090", 24),
    Card("RTX 5090", 32),
    Card("A100 40GB", 40),
    Card("L40S / RTX 6000 Ada", 48),
    Card("A100 / H100 80GB", 80),
    Card("H200", 141),
]

EXAMPLES = """Examples:

  backprop estimate-vram --model demo

  backprop estimate-vram --model ./my-model --method qlora --seq 4096 --batch 2 --json
"""


def model_config(model: str) -> dict[str, Any]:
    """The model's config.json: a demo model, a local folder, or a hub id already in the local cache."""
    from backpropagate.models.demo import DEMO_NAMES, resolve_model

    folder = Path(resolve_model(model)) if model in DEMO_NAMES else Path(model).expanduser()
    path = folder / "config.json"
    if not path.is_file() and not folder.exists():
        try:
            path = _cached_or_fetched_config(model)
        except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated: one coded error
            raise BackpropError(
                ErrorCode.DEP_MODEL_LOAD_FAILED,
                f"Cannot read the config of {model!r}: {type(exc).__name__}: {exc}".splitlines()[0],
                hint="Pass a local model folder (with config.json), or connect once so the hub id is cached.",
            ) from None
    if not path.is_file():
        raise BackpropError(ErrorCode.DEP_MODEL_LOAD_FAILED, f"{folder} has no config.json.")
    return json.loads(path.read_text())


def _cached_or_fetched_config(model: str) -> Path:
    """The hub's config.json from the local cache; fetched only when not offline."""
    import os

    from huggingface_hub import hf_hub_download

    from backpropagate.settings import get_settings

    try:
        return Path(hf_hub_download(model, "config.json", local_files_only=True))
    except Exception:
        if get_settings().offline or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise
    return Path(hf_hub_download(model, "config.json"))


def largest_fit(estimate: Any, memory_gib: float) -> int | None:
    """The largest micro-batch (a power of two up to 64) whose estimate fits, or None."""
    best = None
    batch = 1
    while batch <= LARGEST_MICRO_BATCH:
        if estimate(batch).fits(memory_gib * USABLE):
            best = batch
        batch *= 2
    return best


def register(app: typer.Typer) -> None:
    @app.command("estimate-vram", epilog=EXAMPLES)
    def estimate_vram(
        model: str = typer.Option("demo", "--model", "-m", help="A demo name, a model folder or a cached hub id."),
        method: str = typer.Option("lora", "--method", help="lora, qlora or full."),
        seq: int = typer.Option(2048, "--seq", help="Sequence length in tokens."),
        batch: int = typer.Option(1, "--batch", help="Micro-batch per device."),
        lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank."),
        checkpointing: bool = typer.Option(
            False, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the estimate and the card table as JSON."),
    ) -> None:
        """Estimate the peak GPU memory of a training step, and which cards it fits on.

        The same arithmetic as the New run page's estimate (weights, trainable state, activations, logits, overhead); bench/RESULTS.md states how far it is from measured peaks.
        """
        from backpropagate.training.memory import estimate_memory, shape_from_config

        if method not in ("lora", "qlora", "full"):
            raise BackpropError(ErrorCode.CONFIG_INVALID, f"--method must be lora, qlora or full, not {method!r}.")
        if seq < 1 or batch < 1 or lora_r < 1:
            raise BackpropError(ErrorCode.CONFIG_INVALID, "--seq, --batch and --lora-r must be at least 1.")
        shape = shape_from_config(model_config(model))

        def estimate(micro_batch: int) -> Any:
            return estimate_memory(
                shape, method=method, seq_len=seq, micro_batch=micro_batch,  # type: ignore[arg-type]
                gradient_checkpointing=checkpointing, lora_r=lora_r,
            )  # fmt: skip

        chosen = estimate(batch)
        cards = [
            {
                "card": card.name,
                "memory_gib": card.memory_gib,
                "fits": chosen.fits(card.memory_gib * USABLE),
                "largest_micro_batch": largest_fit(estimate, card.memory_gib),
            }
            for card in CARDS
        ]
        if as_json:
            print(json.dumps({"model": model, "method": method, "seq_len": seq, "estimate": chosen.to_dict(),
                              "parameters": shape.n_params, "cards": cards}, indent=2))  # fmt: skip
            return
        _print(model, method, seq, shape.n_params, chosen, cards)


def _print(model: str, method: str, seq: int, params: int, chosen: Any, cards: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"{model}: {params / 1e6:,.1f}M parameters, {method}, {seq} tokens x micro-batch {chosen.micro_batch}"
        f"{', gradient checkpointing' if chosen.gradient_checkpointing else ''}"
    )
    parts = Table(show_header=False, box=None)
    for label, value in (
        ("weights", chosen.weights_gib), ("trainable state", chosen.trainable_gib),
        ("activations", chosen.activations_gib), ("logits", chosen.logits_gib),
        ("overhead", chosen.overhead_gib), ("total", chosen.total_gib),
    ):  # fmt: skip
        parts.add_row(label, f"{value:,.2f} GiB")
    console.print(parts)
    table = Table(title=f"Cards (usable memory: {USABLE:.0%} of the card)")
    for col in ("card", "memory", "fits", "largest micro-batch"):
        table.add_column(col)
    for row in cards:
        largest = row["largest_micro_batch"]
        table.add_row(row["card"], f"{row['memory_gib']:g} GiB", "yes" if row["fits"] else "no",
                      str(largest) if largest else "-")  # fmt: skip
    console.print(table)
