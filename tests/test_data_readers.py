"""Readers: every file type yields rows with the right provenance (file, line or row number)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate.data.loading import collect, load_examples
from backpropagate.data.readers import read_source
from backpropagate.errors import BackpropError, ErrorCode

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def rows_of(path):
    return [row for _, rows in read_source(path) for row in rows]


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_jsonl_skips_blank_lines_and_keeps_physical_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(chat("a", "b")) + "\n\n   \n" + "{oops\n" + json.dumps(chat("c", "d")) + "\n")
    rows = rows_of(f)
    assert [r.line for r in rows] == [1, 4, 5]
    assert rows[1].record is None and "invalid JSON" in rows[1].error
    assert rows[2].record["messages"][0]["content"] == "c"


def test_jsonl_line_that_is_not_an_object(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('[1, 2]\n"text"\n')
    rows = rows_of(f)
    assert [r.error for r in rows] == ["expected a JSON object, got list", "expected a JSON object, got str"]


def test_json_array_and_data_object_number_rows_from_one(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([chat("q1", "a1"), chat("q2", "a2")], indent=2))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"version": 1, "data": [chat("q3", "a3")]}))
    assert [(r.line, r.record["messages"][0]["content"]) for r in rows_of(a)] == [(1, "q1"), (2, "q2")]
    assert [r.record["messages"][1]["content"] for r in rows_of(b)] == ["a3"]


def test_json_file_holding_json_lines_is_read_line_by_line(tmp_path):
    f = tmp_path / "lines.json"
    f.write_text(json.dumps(chat("q1", "a1")) + "\n" + json.dumps(chat("q2", "a2")) + "\n")
    assert [r.line for r in rows_of(f)] == [1, 2]


def test_broken_json_file_is_a_parse_error_with_its_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n {"text": "fine"},\n {"text": \n]\n')
    got = collect(f)
    assert got.file_errors and got.file_errors[0].code == ErrorCode.DATASET_PARSE_FAILED
    assert "bad.json:4" in str(got.file_errors[0])
    with pytest.raises(BackpropError) as exc:
        load_examples(f)
    assert exc.value.code == ErrorCode.DATASET_PARSE_FAILED


def test_csv_reports_the_line_a_row_ends_on_and_decodes_json_cells(tmp_path):
    f = tmp_path / "d.csv"
    messages = json.dumps(chat("hi", "hello")["messages"])
    # Row 2 has a quoted cell spanning two physical lines, so the next row starts on line 4.
    f.write_text(
        "messages\n"
        + '"'
        + messages.replace('"', '""')
        + '"\n'
        + '"'
        + json.dumps(chat("two\nlines", "ok")["messages"]).replace('"', '""').replace("\\n", "\n")
        + '"\n'
        + '"'
        + messages.replace('"', '""')
        + '"\n'
    )
    rows = rows_of(f)
    assert [r.line for r in rows] == [2, 4, 5]
    assert rows[0].record["messages"][1]["content"] == "hello"


def test_example_csv_holds_alpaca_rows_including_a_multiline_cell():
    loaded = load_examples(EXAMPLES / "alpaca.csv")
    assert set(loaded.formats.values()) == {"alpaca"}
    last = loaded.examples[-1]
    assert last.messages[-1]["content"] == "apple\nbanana\ncherry"
    assert last.messages[0]["content"] == "List three fruits, one per line."


def test_parquet_rows_keep_nested_messages():
    import pyarrow.parquet as pq

    table = pq.read_table(EXAMPLES / "openai.parquet").to_pylist()
    loaded = load_examples(EXAMPLES / "openai.parquet")
    assert len(loaded.examples) == len(table)
    assert loaded.examples[1].messages == table[1]["messages"]
    assert [e.line for e in loaded.examples][:3] == [1, 2, 3]


def test_text_file_becomes_one_row_per_paragraph(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("first paragraph\nstill first\n\n\nsecond one\n")
    rows = rows_of(f)
    assert [(r.line, r.record["text"]) for r in rows] == [
        (1, "first paragraph\nstill first"),
        (5, "second one"),
    ]


def test_folder_reads_every_data_file_with_a_format_per_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text(json.dumps(chat("q", "a")) + "\n")
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "plain"}) + "\n")
    (tmp_path / "notes.md").write_text("not data")
    loaded = load_examples(tmp_path)
    assert {Path(k).name: v for k, v in loaded.formats.items()} == {"a.jsonl": "openai", "b.jsonl": "text"}
    assert sorted(e.kind for e in loaded.examples) == ["chat", "text"]


def test_saved_datasets_folder_is_read(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"text": "one"}, {"text": "two"}]).save_to_disk(str(tmp_path / "saved"))
    loaded = load_examples(tmp_path / "saved")
    assert [e.text for e in loaded.examples] == ["one", "two"]


def test_missing_path_and_offline_hub_id_are_not_found(tmp_path):
    with pytest.raises(BackpropError) as exc:
        load_examples(tmp_path / "nope.jsonl")
    assert exc.value.code == ErrorCode.DATASET_NOT_FOUND and "nope.jsonl" in exc.value.message
    with pytest.raises(BackpropError) as exc:
        load_examples("someone/not-on-this-machine")
    assert exc.value.code == ErrorCode.DATASET_NOT_FOUND
    assert "someone/not-on-this-machine" in exc.value.message


def test_empty_folder_is_not_found(tmp_path):
    with pytest.raises(BackpropError) as exc:
        load_examples(tmp_path)
    assert exc.value.code == ErrorCode.DATASET_NOT_FOUND


def test_missing_relative_file_is_not_mistaken_for_a_hub_id():
    with pytest.raises(BackpropError) as exc:
        load_examples("data/train.jsonl")
    assert (
        exc.value.code == ErrorCode.DATASET_NOT_FOUND
        and "No file or folder at data/train.jsonl" in exc.value.message
    )


def test_uploaded_data_set_id_resolves_under_home(isolated_home):
    from backpropagate.settings import get_settings

    folder = get_settings().datasets_dir / "upload-123"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(json.dumps({"text": "uploaded"}) + "\n")
    assert [e.text for e in load_examples("upload-123").examples] == ["uploaded"]


def test_offline_setting_refuses_hub_ids_without_trying(isolated_home, monkeypatch):
    from backpropagate.settings import get_settings

    monkeypatch.setenv("BACKPROPAGATE_OFFLINE", "1")
    get_settings.cache_clear()
    with pytest.raises(BackpropError) as exc:
        load_examples("org/name")
    assert exc.value.code == ErrorCode.DATASET_NOT_FOUND and "BACKPROPAGATE_OFFLINE" in exc.value.message


def test_null_columns_do_not_decide_the_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a document", "messages": None}, {"text": "another", "messages": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    loaded = load_examples(tmp_path / "t.parquet")
    assert list(loaded.formats.values()) == ["text"] and [e.text for e in loaded.examples] == [
        "a document",
        "another",
    ]
