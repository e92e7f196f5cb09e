"""Check a data set before training and describe it: the report behind `backprop data validate`.

:func:`validate_dataset` never raises on bad rows: it collects every problem with its file and
line, counts tokens with the model's tokenizer, and returns a JSON-serializable report that the
CLI prints and the web app shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from backpropagate.data.formats import Example
from backpropagate.data.loading import RowIssue, collect
from backpropagate.data.tokenize import tokenize_example
from backpropagate.errors import BackpropError, ErrorCode


class TokenStats(BaseModel):
    min: int
    mean: float
    p50: int
    p95: int
    max: int


class HistogramBin(BaseModel):
    """Rows whose token length is in [start, end)."""

    start: int
    end: int
    count: int


class ValidationReport(BaseModel):
    """Everything known about a data set before training on it."""

    ok: bool
    path: str
    model: str | None
    max_seq_len: int
    rows: int
    total_rows: int
    formats: dict[str, str]
    kinds: dict[str, int]
    token_stats: TokenStats | None = None
    # Preference pairs: the lengths of prompt + rejected (token_stats measures prompt + chosen).
    rejected_token_stats: TokenStats | None = None
    histogram: list[HistogramBin] = []
    over_max_len: int = 0
    total_tokens: int = 0
    duplicates: int = 0
    skipped: list[RowIssue] = []
    errors: list[RowIssue] = []
    preview: list[dict[str, Any]] = []

    @property
    def error_code(self) -> ErrorCode | None:
        """The code a failing report maps to (the first problem's), None when ok."""
        if self.ok:
            return None
        if self.errors:
            return ErrorCode(self.errors[0].code)
        return ErrorCode.DATASET_EMPTY

    def summary(self) -> str:
        """One line saying why the report is not ok."""
        if self.ok:
            return f"{self.rows} rows OK"
        if self.errors:
            more = f" (and {len(self.errors) - 1} more problems)" if len(self.errors) > 1 else ""
            return f"{self.errors[0]}{more}"
        return f"No usable rows in {self.path}."


def load_tokenizer_for(model: str) -> Any:
    """The tokenizer of a model name: demo names need no built model (same tokenizer)."""
    from backpropagate.models.demo import DEMO_NAMES, build_tokenizer, demo_path, is_built, resolve_model
    from backpropagate.models.tokenizer import load_tokenizer

    if model in DEMO_NAMES and not is_built(demo_path(model)):
        return build_tokenizer()
    try:
        return load_tokenizer(resolve_model(model))
    except BackpropError:
        raise
    except Exception as exc:  # hub errors, missing files and bad configs all surface differently
        raise BackpropError(
            ErrorCode.DEP_MODEL_LOAD_FAILED,
            f"Could not load the tokenizer of {model!r}: {type(exc).__name__}: {exc}",
        ) from None


def _percentile(sorted_values: list[int], q: float) -> int:
    # Nearest-rank percentile: always an actual row length.
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def histogram(lengths: list[int], bins: int = 10) -> list[HistogramBin]:
    """Equal-width bins (whole tokens) from the shortest row to the longest; counts sum to rows."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    bins = min(bins, high - low + 1)
    width = math.ceil((high - low + 1) / bins)
    counts = [0] * math.ceil((high - low + 1) / width)
    for n in lengths:
        counts[(n - low) // width] += 1
    return [
        HistogramBin(start=low + i * width, end=low + (i + 1) * width, count=c) for i, c in enumerate(counts)
    ]


def _stats(lengths: list[int]) -> TokenStats:
    ordered = sorted(lengths)
    return TokenStats(
        min=ordered[0],
        mean=round(sum(ordered) / len(ordered), 2),
        p50=_percentile(ordered, 0.5),
        p95=_percentile(ordered, 0.95),
        max=ordered[-1],
    )


def _key(ex: Example) -> str:
    return json.dumps([ex.kind, ex.messages, ex.text, ex.chosen, ex.rejected], sort_keys=True)


def validate_dataset(
    path: str | Path,
    *,
    model: str | None = "demo",
    max_seq_len: int = 1024,
    data_format: str = "auto",
    skip_bad_rows: bool = False,
    preview_rows: int = 5,
    tokenizer: Any = None,
    train_on: str = "responses",
) -> ValidationReport:
    """Read, check and measure a data set; problems go into the report, not exceptions.

    ``tokenizer`` (a loaded tokenizer) takes precedence over ``model``; with neither, token
    statistics are left out.
    """
    got = collect(path, data_format)
    examples = got.examples
    errors = list(got.file_errors)
    skipped: list[RowIssue] = []
    if skip_bad_rows:
        skipped = got.bad_rows
    else:
        errors += got.bad_rows
    kinds: dict[str, int] = {}
    for ex in examples:
        kinds[ex.kind] = kinds.get(ex.kind, 0) + 1

    seen: set[str] = set()
    duplicates = 0
    for ex in examples:
        key = _key(ex)
        duplicates += key in seen
        seen.add(key)

    report = ValidationReport(
        ok=not errors and bool(examples),
        path=str(path),
        model=model if tokenizer is None else getattr(tokenizer, "name_or_path", None) or model,
        max_seq_len=max_seq_len,
        rows=len(examples),
        total_rows=len(examples) + len(got.bad_rows),
        formats=got.formats,
        kinds=kinds,
        duplicates=duplicates,
        skipped=skipped,
        errors=errors,
        preview=[ex.to_preview() for ex in examples[:preview_rows]],
    )
    if tokenizer is None and model is not None and examples:
        tokenizer = load_tokenizer_for(model)
    lengths: list[int] = []
    rejected_lengths: list[int] = []
    if tokenizer is not None:
        for ex in examples:
            try:
                tok = tokenize_example(ex, tokenizer, max_seq_len=max_seq_len, train_on=train_on)  # type: ignore[arg-type]
            except BackpropError as exc:
                report.errors.append(
                    RowIssue(code=str(exc.code), file=ex.source, line=ex.line, message=exc.message)
                )
                continue
            lengths.append(tok.length)
            if ex.kind == "preference":
                other = replace(ex, chosen=ex.rejected)
                rejected_lengths.append(tokenize_example(other, tokenizer, max_seq_len=max_seq_len).length)
        report.ok = report.ok and not report.errors
    if rejected_lengths:
        report.rejected_token_stats = _stats(rejected_lengths)
    if lengths:
        report.token_stats = _stats(lengths)
        report.histogram = histogram(lengths)
        report.over_max_len = sum(n > max_seq_len for n in lengths)
        report.total_tokens = sum(lengths)
    return report
