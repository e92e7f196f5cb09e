"""The validation report: numbers checked against an independent count, problems with lines, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from backpropagate.data.validate import ValidationReport, histogram, validate_dataset
from backpropagate.errors import ErrorCode

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def tok():
    from backpropagate.models.demo import build_tokenizer

    return build_tokenizer()


def test_report_numbers_match_an_independent_count(tok):
    rows = [json.loads(line) for line in (EXAMPLES / "quickstart.jsonl").read_text().splitlines()]
    lengths = sorted(
        len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
        for r in rows
    )
    report = validate_dataset(EXAMPLES / "quickstart.jsonl", tokenizer=tok, max_seq_len=40)
    assert report.ok and report.rows == report.total_rows == len(rows)
    assert report.formats == {str(EXAMPLES / "quickstart.jsonl"): "openai"}
    assert report.kinds == {"chat": len(rows)}
    s = report.token_stats
    assert (s.min, s.max) == (lengths[0], lengths[-1])
    assert s.mean == pytest.approx(sum(lengths) / len(lengths), abs=0.01)
    assert s.p50 == lengths[math.ceil(0.5 * len(lengths)) - 1]
    assert s.p95 == lengths[math.ceil(0.95 * len(lengths)) - 1]
    assert report.over_max_len == sum(n > 40 for n in lengths) > 0
    assert report.total_tokens == sum(lengths)
    assert sum(b.count for b in report.histogram) == len(rows)
    assert report.histogram[0].start == lengths[0] and report.histogram[-1].end > lengths[-1]
    assert report.preview[0]["messages"] == rows[0]["messages"] and len(report.preview) == 5


def test_report_is_json_serializable_and_round_trips(tok):
    report = validate_dataset(EXAMPLES / "bad_rows.jsonl", tokenizer=tok, skip_bad_rows=True)
    again = ValidationReport.model_validate_json(report.model_dump_json())
    assert again == report
    assert json.loads(report.model_dump_json())["skipped"][0]["line"] == 3


def test_bad_rows_are_collected_not_raised(tok):
    report = validate_dataset(EXAMPLES / "bad_rows.jsonl", tokenizer=tok)
    assert not report.ok and report.error_code == ErrorCode.DATASET_PARSE_FAILED
    assert [e.line for e in report.errors] == [3, 4, 5, 6, 7, 8]
    assert report.rows == 4 and report.total_rows == 10
    assert report.token_stats is not None  # the good rows are still measured
    skipped = validate_dataset(EXAMPLES / "bad_rows.jsonl", tokenizer=tok, skip_bad_rows=True)
    assert skipped.ok and skipped.errors == [] and len(skipped.skipped) == 6


def test_duplicates_are_counted(tmp_path):
    row = {"instruction": "Say hi", "output": "hi"}
    f = tmp_path / "d.json"
    f.write_text(json.dumps([row, {"instruction": "Say bye", "output": "bye"}, row, row]))
    report = validate_dataset(f, model=None)
    assert report.ok and report.duplicates == 2 and report.token_stats is None


def test_mixed_and_empty_data_sets_are_not_ok(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n{"instruction": "b", "output": "c"}\n')
    report = validate_dataset(mixed, model=None)
    assert not report.ok and report.error_code == ErrorCode.DATASET_FORMAT_UNSUPPORTED
    assert "text on lines 1" in report.errors[0].message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    report = validate_dataset(empty, model=None)
    assert not report.ok and report.error_code == ErrorCode.DATASET_EMPTY and report.rows == 0


def test_default_model_is_the_demo_tokenizer(tok):
    report = validate_dataset(EXAMPLES / "text.jsonl")
    expected = validate_dataset(EXAMPLES / "text.jsonl", tokenizer=tok)
    assert report.model == "demo" and report.token_stats == expected.token_stats


def test_histogram_bins_cover_the_range():
    bins = histogram([3, 3, 4, 10, 25], bins=5)
    assert [(b.start, b.end, b.count) for b in bins] == [
        (3, 8, 3),
        (8, 13, 1),
        (13, 18, 0),
        (18, 23, 0),
        (23, 28, 1),
    ]
    assert histogram([7, 7]) == [histogram([7])[0].model_copy(update={"count": 2})]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", "data", "validate", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_cli_json_report():
    out = run_cli("examples/alpaca.json", "--json", "--max-seq-len", "32")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["ok"] and data["rows"] == 30 and data["formats"] == {"examples/alpaca.json": "alpaca"}
    assert data["over_max_len"] > 0 and data["token_stats"]["max"] > 32


def test_cli_table_and_failure_exit_code():
    ok = run_cli("examples/sharegpt.jsonl")
    assert ok.returncode == 0, ok.stderr
    assert "sharegpt" in ok.stdout and "token length histogram" in ok.stdout
    bad = run_cli("examples/bad_rows.jsonl", "--model", "none")
    assert bad.returncode == 1
    assert bad.stderr.startswith("[DATASET_PARSE_FAILED] examples/bad_rows.jsonl:3: invalid JSON")
    assert "examples/bad_rows.jsonl:7: message 1: unknown role 'narrator'" in bad.stdout
    assert "hint:" in bad.stderr


def test_template_refusals_become_report_errors_with_lines(tok):
    import copy

    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + tok.chat_template
    )
    report = validate_dataset(EXAMPLES / "quickstart.jsonl", tokenizer=strict)
    assert not report.ok
    # quickstart.jsonl has a system message on every fourth line: 1, 5, 9
    assert [(e.line, e.code) for e in report.errors] == [(n, "CONFIG_INVALID_SETTING") for n in (1, 5, 9)]
    assert "System role not supported" in report.errors[0].message
    assert sum(b.count for b in report.histogram) == 9


def test_unloadable_model_is_a_model_load_error(tmp_path):
    from backpropagate.errors import BackpropError

    with pytest.raises(BackpropError) as exc:
        validate_dataset(EXAMPLES / "text.jsonl", model=str(tmp_path))
    assert exc.value.code == ErrorCode.DEP_MODEL_LOAD_FAILED and str(tmp_path) in exc.value.message
