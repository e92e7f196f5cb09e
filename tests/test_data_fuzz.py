"""Fuzzing the data entry points: loader, validator and preview raise only coded errors."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backpropagate.data.loading import load_examples
from backpropagate.data.preview import preview_rows
from backpropagate.data.validate import validate_dataset
from backpropagate.errors import BackpropError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = ("jsonl", "json", "csv", "txt", "parquet")

# Pieces that break readers: bad UTF-8, deep nesting, quotes, separators, BOMs, NUL.
NASTY = st.sampled_from(
    [
        b"\xff",
        b"\xc3",
        b"\xe9",
        b"[" * 3000,
        b"{" * 3000,
        b'"',
        b",",
        b"\n",
        b"\r\n",
        b"\x00",
        b"\xef\xbb\xbf",
    ]
)
CONTENT = st.lists(st.one_of(st.binary(max_size=40), NASTY), max_size=12).map(b"".join)


def only_coded(call: Callable[[], object]) -> None:
    with contextlib.suppress(BackpropError):
        call()


def entry_points(path: Path, suffix: str) -> None:
    only_coded(lambda: load_examples(path))
    only_coded(lambda: load_examples(path, skip_bad_rows=True))
    report = validate_dataset(path, model=None, skip_bad_rows=True)
    assert all(i.line is not None for i in report.skipped)
    report.model_dump_json()
    only_coded(lambda: json.dumps(preview_rows(path, suffix, 5), default=str))


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), content=CONTENT)
def test_arbitrary_bytes_give_only_coded_errors(suffix, content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d.{suffix}"
        path.write_bytes(content)
        entry_points(path, suffix)


def parquet_bytes(n: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"text": f"row {i}"} for i in range(n)]), out, row_group_size=7)
    return out.getvalue()


PARQUET = parquet_bytes(30)


@FUZZ
@given(cut=st.integers(0, len(PARQUET) - 1), flip=st.integers(0, len(PARQUET) - 1))
def test_truncated_or_flipped_parquet_gives_only_coded_errors(cut, flip):
    damaged = bytearray(PARQUET)
    damaged[flip] ^= 0xFF
    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate((PARQUET[:cut], bytes(damaged))):
            path = Path(tmp) / f"d{i}.parquet"
            path.write_bytes(data)
            entry_points(path, "parquet")


CORRUPTIONS = [
    b'{"text": "caf\xe9"}',  # not UTF-8
    b'{"text": "cut',  # invalid JSON
    b"[" * 100_000,  # too deep to parse
    b'{"text": ' + b"[" * 200 + b"]" * 200 + b"}",  # parses, but too deep to use
    b'["a list"]',  # not an object
    b'{"text": "\xff\xfe"}',
]


@FUZZ
@given(
    n=st.integers(1, 60),
    data=st.data(),
)
def test_skip_mode_keeps_exactly_the_good_rows(n, data):
    bad = data.draw(st.sets(st.integers(1, n), max_size=n), label="bad lines")
    lines = [
        data.draw(st.sampled_from(CORRUPTIONS), label=f"line {i}")
        if i in bad
        else json.dumps({"text": f"row {i} \u00e9"}).encode()
        for i in range(1, n + 1)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        report = validate_dataset(path, model=None, skip_bad_rows=True)
        assert report.rows == n - len(bad) and report.total_rows == n
        assert sorted(i.line for i in report.skipped) == sorted(bad)
        if len(bad) < n:
            loaded = load_examples(path, skip_bad_rows=True)
            assert [ex.line for ex in loaded.examples] == [i for i in range(1, n + 1) if i not in bad]
            assert sorted(i.line for i in loaded.skipped) == sorted(bad)


@settings(max_examples=10, deadline=None)
@given(size=st.integers(100_000, 300_000), suffix=st.sampled_from(["csv", "jsonl", "txt"]))
def test_huge_fields_load(size, suffix):
    big = "h" * size
    body = {"csv": f"text\n{big}\n", "jsonl": json.dumps({"text": big}) + "\n", "txt": big + "\n"}[suffix]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d.{suffix}"
        path.write_text(body)
        assert [len(ex.text) for ex in load_examples(path).examples] == [size]
        entry_points(path, suffix)
