"""The training engine's entry to the data: load, split, tokenize and pack a run's data sets.

``prepare_datasets(config, tokenizer)`` returns the train and eval rows (dicts of token id
lists, packed when ``config.packing``) and the numbers a run reports: rows, skipped, truncated,
tokens. The split is a seeded shuffle of the examples, so the same config gives the same split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from backpropagate.data.formats import Example
from backpropagate.data.loading import RowIssue, load_examples
from backpropagate.data.packing import pack, packing_efficiency
from backpropagate.data.preference import IGNORE, row_tokens
from backpropagate.data.readers import is_saved_dataset, list_files, resolve_data_path
from backpropagate.data.tokenize import tokenize_example
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.logs import get_logger

log = get_logger(__name__)


class DataStats(BaseModel):
    """What preparing the data did, for the run's events and model card."""

    rows: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    train_sequences: int = 0
    eval_sequences: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0
    packing_efficiency: float | None = None
    formats: dict[str, str] = {}


@dataclass
class PreparedData:
    """Token id rows ready for :func:`backpropagate.data.packing.collate`."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    stats: DataStats
    skipped: list[RowIssue] = field(default_factory=list)


def split_examples(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the first ``fraction`` of it held out (at least one row if any)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(examples) * fraction) if fraction > 0 else 0
    if fraction > 0 and len(examples) >= 2:
        n_eval = min(max(n_eval, 1), len(examples) - 1)
    held = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evals = [ex for i, ex in enumerate(examples) if i in held]
    random.Random(seed + 1).shuffle(train)
    return train, evals


def _tokenize_all(examples: list[Example], tokenizer: Any, config: Any, stats: DataStats) -> list[dict]:
    if config.objective != "sft":
        return _tokenize_preference(examples, tokenizer, config, stats)
    rows = []
    for ex in examples:
        tok = tokenize_example(ex, tokenizer, max_seq_len=config.max_seq_len, train_on=config.train_on)
        stats.truncated += tok.truncated
        if tok.trained_tokens == 0:
            # Truncation cut every response token: the row would add nothing but compute.
            stats.dropped_no_labels += 1
            continue
        rows.append(tok.as_dict())
    return rows


def _tokenize_preference(
    examples: list[Example], tokenizer: Any, config: Any, stats: DataStats
) -> list[dict]:
    from backpropagate.data.preference import response_tokens, tokenize_for_objective

    rows = []
    for ex in examples:
        for row, truncated in tokenize_for_objective(ex, config.objective, tokenizer, config.max_seq_len):
            stats.truncated += truncated
            if response_tokens(row) == 0:
                stats.dropped_no_labels += 1
                continue
            rows.append(row)
    return rows


def prepare_datasets(config: Any, tokenizer: Any) -> PreparedData:
    """Load, split, tokenize and (optionally) pack ``config.data`` / ``config.eval_data``."""
    loaded = load_examples(config.data, config.data_format, config.skip_bad_rows)
    stats = DataStats(rows=len(loaded.examples), skipped=len(loaded.skipped), formats=dict(loaded.formats))
    skipped = list(loaded.skipped)
    if config.eval_data:
        extra = load_examples(config.eval_data, config.data_format, config.skip_bad_rows)
        stats.skipped += len(extra.skipped)
        stats.formats.update(extra.formats)
        skipped += extra.skipped
        train_ex = list(loaded.examples)
        random.Random(config.seed + 1).shuffle(train_ex)
        eval_ex = extra.examples
    else:
        train_ex, eval_ex = split_examples(loaded.examples, config.eval_fraction, config.seed)
    if skipped:
        log.warning("skipped %d bad rows (first: %s)", len(skipped), skipped[0])

    train = _tokenize_all(train_ex, tokenizer, config, stats)
    evals = _tokenize_all(eval_ex, tokenizer, config, stats)
    if not train:
        raise BackpropError(
            ErrorCode.DATASET_EMPTY,
            f"No training rows left in {config.data} after truncation to max_seq_len={config.max_seq_len} "
            f"({stats.dropped_no_labels} rows had no response tokens left).",
            hint="Raise --max-seq-len or shorten the prompts.",
        )
    stats.train_examples, stats.eval_examples = len(train), len(evals)
    stats.train_tokens = sum(row_tokens(r) for r in train)
    stats.trained_tokens = sum(label_count(r) for r in train)
    # Preference objectives compare whole sequences, one per row: they are never packed.
    if config.packing and config.objective == "sft":
        train = pack(train, config.max_seq_len)
        evals = pack(evals, config.max_seq_len)
        stats.packing_efficiency = round(packing_efficiency(train, config.max_seq_len), 4)
        # Packing orders sequences by size; shuffle so batches are not sorted by length.
        random.Random(config.seed + 2).shuffle(train)
    stats.train_sequences, stats.eval_sequences = len(train), len(evals)
    return PreparedData(train, evals, stats, skipped)


def label_count(row: dict[str, Any]) -> int:
    """Tokens of a row that carry loss (both sides of a pair)."""
    keys = [k for k in ("labels", "chosen_labels", "rejected_labels") if k in row]
    return sum(sum(1 for x in row[k] if x != IGNORE) for k in keys)


def dataset_fingerprint(paths: str | Path | Iterable[str | Path]) -> str:
    """sha256 over the bytes of every data file (names relative to each path, in sorted order).

    A hub id that is not a local path is hashed by name (its content is not on this machine).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    digest = hashlib.sha256()
    for path in paths:
        p = resolve_data_path(path)
        if not p.exists():
            digest.update(f"hub:{path}\0".encode())
            continue
        root = p if p.is_dir() else p.parent
        files = sorted(f for f in p.rglob("*") if f.is_file()) if is_saved_dataset(p) else list_files(p)
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0")
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()
