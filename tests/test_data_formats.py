"""Format detection and normalization: every format, bad rows with lines, mixing and skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate.data.loading import collect, load_examples
from backpropagate.errors import BackpropError, ErrorCode

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("name", "fmt", "kind"),
    [
        ("quickstart.jsonl", "openai", "chat"),
        ("sharegpt.jsonl", "sharegpt", "chat"),
        ("alpaca.json", "alpaca", "chat"),
        ("alpaca.csv", "alpaca", "chat"),
        ("text.jsonl", "text", "text"),
        ("preference.jsonl", "preference", "preference"),
        ("openai.parquet", "openai", "chat"),
    ],
)
def test_each_example_file_is_detected(name, fmt, kind):
    loaded = load_examples(EXAMPLES / name)
    assert list(loaded.formats.values()) == [fmt]
    assert loaded.examples and {e.kind for e in loaded.examples} == {kind}
    assert loaded.skipped == []


def test_sharegpt_roles_and_system_are_normalized(tmp_path):
    f = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {
                "system": "Be brief.",
                "conversations": [
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                    {"from": "human", "value": "Bye"},
                    {"from": "gpt", "value": "Goodbye"},
                ],
            }
        ],
    )
    (ex,) = load_examples(f).examples
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]


def test_alpaca_input_follows_the_instruction(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(
        json.dumps(
            [
                {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
                {"instruction": "Say hi.", "input": "", "output": "hi"},
            ]
        )
    )
    a, b = load_examples(f).examples
    assert a.messages == [
        {"role": "user", "content": "Translate to French.\n\ncat"},
        {"role": "assistant", "content": "chat"},
    ]
    assert b.messages[0] == {"role": "user", "content": "Say hi."}


def test_openai_content_parts_are_joined(tmp_path):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    f = write_jsonl(
        tmp_path / "o.jsonl",
        [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Hi"}]}],
    )
    assert load_examples(f).examples[0].messages[0]["content"] == "Hello there"


def test_preference_pairs_string_and_conversational(tmp_path):
    f = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {
                "prompt": [{"role": "user", "content": "Capital of Italy?"}],
                "chosen": [{"role": "assistant", "content": "Rome"}],
                "rejected": [{"role": "assistant", "content": "Milan"}],
            },
        ],
    )
    a, b = load_examples(f).examples
    assert (a.messages, a.chosen, a.rejected) == ([{"role": "user", "content": "2+2?"}], "4", "5")
    assert b.sft_messages() == [
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome"},
    ]


def test_bad_rows_example_names_each_line_and_problem():
    got = collect(EXAMPLES / "bad_rows.jsonl")
    problems = {i.line: i.message for i in got.bad_rows}
    assert sorted(problems) == [3, 4, 5, 6, 7, 8]
    assert "invalid JSON" in problems[3]
    assert "must start with a user message, not assistant" in problems[4]
    assert "two user messages in a row" in problems[5]
    assert "empty content" in problems[6]
    assert "unknown role 'narrator'" in problems[7]
    assert "missing content" in problems[8]
    assert [e.line for e in got.examples] == [1, 2, 9, 10]


def test_bad_rows_fail_with_parse_error_naming_file_and_line():
    with pytest.raises(BackpropError) as exc:
        load_examples(EXAMPLES / "bad_rows.jsonl")
    err = exc.value
    assert err.code == ErrorCode.DATASET_PARSE_FAILED
    assert "bad_rows.jsonl:3: invalid JSON" in err.message
    assert "6 bad rows" in err.message
    assert [e["line"] for e in err.details["errors"]] == [3, 4, 5, 6, 7, 8]


def test_skip_bad_rows_skips_and_counts():
    loaded = load_examples(EXAMPLES / "bad_rows.jsonl", skip_bad_rows=True)
    assert len(loaded.examples) == 4
    assert [i.line for i in loaded.skipped] == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"instruction": "Do it", "input": ""}, "missing field 'output'"),
        ({"instruction": "  ", "output": "x"}, "field 'instruction' is empty"),
        ({"messages": "hello"}, "must be a list of messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "must end with an assistant message"),
        ({"messages": [{"content": "hi"}]}, "missing field 'role'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            "a system message may only come first",
        ),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown role 'bot'"),
        ({"text": ""}, "field 'text' is empty"),
        ({"text": 5}, "must be a string, got int"),
        ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ],
)
def test_row_problems_are_specific(tmp_path, row, problem):
    f = write_jsonl(tmp_path / "d.jsonl", [row])
    got = collect(f)
    assert len(got.bad_rows) == 1 and got.bad_rows[0].line == 1
    assert problem in got.bad_rows[0].message


def test_mixed_formats_in_one_file_fail_naming_formats_and_lines(tmp_path):
    f = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"instruction": "Do", "output": "done"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        ],
    )
    with pytest.raises(BackpropError) as exc:
        load_examples(f, skip_bad_rows=True)
    assert exc.value.code == ErrorCode.DATASET_FORMAT_UNSUPPORTED
    assert "openai on lines 1, 3" in exc.value.message
    assert "alpaca on lines 2" in exc.value.message


def test_unknown_shape_fails_naming_the_keys_seen(tmp_path):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}, {"question": "r"}])
    with pytest.raises(BackpropError) as exc:
        load_examples(f)
    assert exc.value.code == ErrorCode.DATASET_FORMAT_UNSUPPORTED
    assert "'question', 'answer'" in exc.value.message and "lines 1, 2" in exc.value.message


def test_stray_row_in_a_known_format_is_a_bad_row(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"body": "misnamed"}, {"text": "also fine"}])
    got = collect(f)
    assert got.formats[str(f)] == "text"
    assert [(i.line, i.message) for i in got.bad_rows] == [(2, "row does not look like text (keys: 'body')")]


def test_explicit_format_overrides_detection(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello", "messages": "ignored"}])
    assert load_examples(f, data_format="text").examples[0].text == "hello"
    with pytest.raises(BackpropError) as exc:
        load_examples(f, data_format="alpaca")
    assert exc.value.code == ErrorCode.DATASET_PARSE_FAILED
    assert "missing field 'instruction'" in exc.value.message


def test_empty_file_and_all_rows_skipped_are_empty(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BackpropError) as exc:
        load_examples(empty)
    assert exc.value.code == ErrorCode.DATASET_EMPTY
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{nope", {"text": ""}])
    with pytest.raises(BackpropError) as exc:
        load_examples(bad, skip_bad_rows=True)
    assert exc.value.code == ErrorCode.DATASET_EMPTY and "2 bad rows were skipped" in exc.value.message
