"""Faults in data files: each gives a coded error naming the file and line, and costs only its row."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import pytest

from backpropagate.data import readers
from backpropagate.data.loading import collect, load_examples
from backpropagate.data.preview import preview_rows
from backpropagate.data.validate import validate_dataset
from backpropagate.errors import BackpropError, ErrorCode


def text_row(i: int) -> bytes:
    return json.dumps({"text": f"row {i}"}).encode() + b"\n"


def jsonl_with_bad_byte(path: Path, n: int, bad_line: int) -> Path:
    rows = [text_row(i) for i in range(1, n + 1)]
    rows[bad_line - 1] = b'{"text": "caf\xe9"}\n'  # Latin-1, not UTF-8
    path.write_bytes(b"".join(rows))
    return path


# 1. Invalid UTF-8 costs exactly its own row, reported at its own line.


def test_bad_byte_on_line_500_of_1000_is_named_at_line_500(tmp_path):
    f = jsonl_with_bad_byte(tmp_path / "d.jsonl", 1000, 500)
    with pytest.raises(BackpropError) as info:
        load_examples(f)
    assert info.value.code == ErrorCode.DATASET_PARSE_FAILED
    assert "1 bad row" in info.value.message and f"{f}:500: not UTF-8" in info.value.message
    assert [e["line"] for e in info.value.details["errors"]] == [500]


def test_bad_byte_skip_mode_trains_on_the_other_999_rows(tmp_path):
    f = jsonl_with_bad_byte(tmp_path / "d.jsonl", 1000, 500)
    loaded = load_examples(f, skip_bad_rows=True)
    assert len(loaded.examples) == 999
    assert [i.line for i in loaded.skipped] == [500]
    assert [ex.line for ex in loaded.examples] == [n for n in range(1, 1001) if n != 500]


def test_bad_byte_validate_counts_every_row(tmp_path):
    f = jsonl_with_bad_byte(tmp_path / "d.jsonl", 1000, 500)
    report = validate_dataset(f, model=None, skip_bad_rows=True)
    assert (report.ok, report.rows, report.total_rows) == (True, 999, 1000)
    assert [i.line for i in report.skipped] == [500]
    strict = validate_dataset(f, model=None)
    assert not strict.ok and [i.line for i in strict.errors] == [500]


def test_bom_is_still_dropped_from_the_first_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + text_row(1) + text_row(2))
    assert len(load_examples(f).examples) == 2


def test_csv_bad_byte_costs_only_its_row(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b'text\nfirst\n"caf\xe9\nspans two lines"\nthird\n')
    got = collect(f)
    assert [ex.line for ex in got.examples] == [2, 5]
    assert [(i.line, i.message[:12]) for i in got.bad_rows] == [(3, "not UTF-8 te")]


def test_txt_bad_byte_costs_only_its_paragraph(tmp_path):
    f = tmp_path / "d.txt"
    f.write_bytes(b"one\n\ntwo \xff here\nstill two\n\nthree\n")
    got = collect(f)
    assert [ex.text for ex in got.examples] == ["one", "three"]
    assert [i.line for i in got.bad_rows] == [3]


def test_json_array_bad_byte_names_its_line(tmp_path):
    f = tmp_path / "d.json"
    f.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}\n]\n')
    got = collect(f)
    assert [(i.line, i.code) for i in got.file_errors] == [(3, "DATASET_PARSE_FAILED")]
    assert got.file_errors[0].message.startswith("not UTF-8")


# 2. Huge CSV cells: read up to the upload limit, a coded error with file and line past it.


def test_csv_cell_over_131072_chars_loads(tmp_path):
    f = tmp_path / "d.csv"
    big = "x" * 200_000
    f.write_text(f"text\nsmall\n{big}\n")
    loaded = load_examples(f)
    assert [len(ex.text) for ex in loaded.examples] == [5, 200_000]
    assert preview_rows(f, "csv", 5)[1]["text"] == big


@pytest.fixture
def tiny_csv_limit(monkeypatch):
    before = csv.field_size_limit()
    monkeypatch.setattr(readers, "csv_field_limit", lambda: csv.field_size_limit(1000))
    yield
    csv.field_size_limit(before)


def test_csv_cell_over_the_limit_is_a_coded_error_with_line(tmp_path, tiny_csv_limit):
    f = tmp_path / "d.csv"
    f.write_text("text\nok\nfine\n" + "y" * 5000 + "\n")
    got = collect(f)
    [issue] = got.file_errors
    assert (issue.code, issue.file, issue.line) == ("DATASET_PARSE_FAILED", str(f), 4)
    assert "CSV error" in issue.message
    with pytest.raises(BackpropError) as info:
        load_examples(f, skip_bad_rows=True)
    assert f"{f}:4: CSV error" in info.value.message
    report = validate_dataset(f, model=None)
    assert not report.ok and report.errors[0].line == 4


def test_csv_field_limit_is_the_upload_limit(isolated_home, monkeypatch):
    monkeypatch.setenv("BACKPROPAGATE_SERVER__MAX_UPLOAD_MB", "3")
    assert readers.csv_field_limit() == 3 * 1024 * 1024 == csv.field_size_limit()


# 3. Parquet bombs: row groups are checked before they are read; previews are bounded.


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, compression="zstd", row_group_size=row_group_size)
    return path


def test_parquet_bomb_preview_is_refused_before_reading(tmp_path):
    f = write_parquet(tmp_path / "bomb.parquet", [{"text": "a" * (64 << 20)}])
    assert f.stat().st_size < 200_000
    with pytest.raises(BackpropError) as info:
        preview_rows(f, "parquet", 1)
    assert info.value.code == ErrorCode.DATASET_PARSE_FAILED and "preview fewer rows" in info.value.message


def test_parquet_row_group_over_the_limit_is_refused_by_the_loader(tmp_path, monkeypatch):
    f = write_parquet(tmp_path / "bomb.parquet", [{"text": "a" * (4 << 20)}])
    monkeypatch.setattr(readers, "MAX_ROW_GROUP_BYTES", 1 << 20)
    got = collect(f)
    [issue] = got.file_errors
    assert issue.code == "DATASET_PARSE_FAILED" and "row group 1 unpacks to 4 MB" in issue.message


def test_parquet_preview_reads_only_the_rows_asked_for(tmp_path):
    f = write_parquet(tmp_path / "d.parquet", [{"text": f"row {i}"} for i in range(5000)], 1000)
    assert preview_rows(f, "parquet", 3) == [{"text": "row 0"}, {"text": "row 1"}, {"text": "row 2"}]
    assert len(load_examples(f).examples) == 5000


def test_truncated_parquet_is_a_coded_error(tmp_path):
    good = write_parquet(tmp_path / "d.parquet", [{"text": f"row {i}"} for i in range(100)])
    f = tmp_path / "cut.parquet"
    f.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert collect(f).file_errors[0].code == "DATASET_PARSE_FAILED"
    with pytest.raises(BackpropError):
        preview_rows(f, "parquet", 1)


def test_json_previews_read_a_bounded_prefix(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "a"}, {"text": "b"}, {"text": "z" * 5000}]))
    assert preview_rows(f, "json", 2, max_bytes=1000) == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(BackpropError) as info:
        preview_rows(f, "json", 3, max_bytes=1000)
    assert info.value.code == ErrorCode.DATASET_PARSE_FAILED
    lines = tmp_path / "d.jsonl"
    lines.write_text('{"text": "a"}\n' + '{"text": "' + "z" * 5000 + '"}\n')
    assert preview_rows(lines, "jsonl", 1, max_bytes=1000) == [{"text": "a"}]
    with pytest.raises(BackpropError):
        preview_rows(lines, "jsonl", 2, max_bytes=1000)
    text = tmp_path / "d.txt"
    text.write_bytes(b"one\ntw\xffo\n" + b"z" * 5000 + b"\n")
    assert preview_rows(text, "txt", 2, max_bytes=1000) == ["one", "tw\ufffdo"]
    with pytest.raises(BackpropError):
        preview_rows(text, "txt", 3, max_bytes=1000)


# 4. Deep JSON: a coded error (or a bad row with its line), never RecursionError.

DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_jsonl_line_is_a_bad_row_at_its_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"text": "ok"}) + "\n" + DEEP + "\n" + '{"text": ' + "[" * 500 + "]" * 500 + "}\n"
    )
    got = collect(f)
    assert [ex.line for ex in got.examples] == [1]
    assert [(i.line, "nested" in i.message) for i in got.bad_rows] == [(2, True), (3, True)]


def test_deep_json_file_is_a_coded_error(tmp_path):
    f = tmp_path / "d.json"
    f.write_text(DEEP)
    assert collect(f).file_errors[0].code == "DATASET_PARSE_FAILED"
    with pytest.raises(BackpropError):
        load_examples(f)
    assert not validate_dataset(f, model=None).ok
    for fmt in ("json", "jsonl"):
        with contextlib.suppress(BackpropError):
            preview_rows(f, fmt, 1)


def test_deep_json_in_a_csv_cell_stays_text(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text(f"text\n{DEEP}\n")
    assert load_examples(f).examples[0].text == DEEP
