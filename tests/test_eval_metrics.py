"""Evaluation metrics against hand computations, and bad eval input refused with stable codes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.evaluation import metrics
from backpropagate.evaluation.runner import read_eval_file

# (expected, prediction, regex): five rows scored by hand below.
ROWS = [
    ("The sky is blue.", "the sky is  blue", None),  # same words: exact, contains, F1 1
    ("Cats say meow.", "Cats say meow loudly.", None),  # contains; F1: P 3/4, R 1 -> 6/7
    ("A dog has four legs.", "A dog has legs.", None),  # F1: P 1, R 4/5 -> 8/9
    ("Fish live in water.", "Birds fly.", "water"),  # nothing; the regex does not match
    ("42", "The answer is 42.", r"\b42\b"),  # contains; F1: P 1/4, R 1 -> 2/5; regex matches
]


@pytest.fixture
def five_row_file(tmp_path: Path) -> Path:
    path = tmp_path / "five.jsonl"
    lines = []
    for expected, _, pattern in ROWS:
        row = {"prompt": f"Q: {expected}", "expected": expected}
        if pattern:
            row["regex"] = pattern
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_metrics_equal_a_hand_computation_on_a_five_row_file(five_row_file):
    rows = read_eval_file(five_row_file)
    assert [r.expected for r in rows] == [r[0] for r in ROWS] and rows[3].regex == "water"
    scores = [
        metrics.score(pred, row.expected, row.regex) for row, (_, pred, _) in zip(rows, ROWS, strict=True)
    ]
    assert [s["exact_match"] for s in scores] == [1, 0, 0, 0, 0]
    assert [s["contains"] for s in scores] == [1, 1, 0, 0, 1]
    assert [s["regex"] for s in scores] == [None, None, None, 0, 1]
    assert [s["token_f1"] for s in scores] == pytest.approx([1, 6 / 7, 8 / 9, 0, 2 / 5])

    summary = metrics.summarise(scores)
    assert summary["n"] == 5
    assert summary["exact_match"] == pytest.approx(1 / 5)
    assert summary["contains"] == pytest.approx(3 / 5)
    assert summary["regex"] == pytest.approx(1 / 2)  # over the two rows that give a pattern
    assert summary["token_f1"] == pytest.approx((1 + 6 / 7 + 8 / 9 + 0 + 2 / 5) / 5)
    # A resampled mean of five 0/1 scores is k/5 with k ~ Binomial(5, p). For p = 1/5:
    # P(k = 0) = 0.33 > 2.5% and P(k <= 2) = 0.94 < 97.5% <= P(k <= 3) = 0.99, so [0, 3/5].
    assert summary["exact_match_ci"] == pytest.approx([0.0, 0.6])
    # p = 3/5: P(k = 0) = 0.01 < 2.5% <= P(k <= 1) = 0.09 and P(k <= 4) = 0.92: so [1/5, 1].
    assert summary["contains_ci"] == pytest.approx([0.2, 1.0])
    lo, hi = summary["token_f1_ci"]
    assert 0 <= lo < summary["token_f1"] < hi <= 1
    assert summary["loss"] is None and summary["perplexity"] is None


def test_paired_difference_interval_and_verdict():
    run = [{"exact_match": x} for x in (1, 1, 1, 1, 0)]
    base = [{"exact_match": 0.0} for _ in range(5)]
    diff = metrics.compare(run, base)["exact_match"]
    # Paired differences are (1, 1, 1, 1, 0): k ~ Binomial(5, 4/5); P(k <= 1) = 0.007 < 2.5% <=
    # P(k <= 2) = 0.058 and P(k <= 4) = 0.67, so the interval is [2/5, 1] and excludes 0.
    assert diff["diff"] == pytest.approx(0.8) and diff["diff_ci"] == pytest.approx([0.4, 1.0])
    assert diff["excludes_zero"] and diff["verdict"] == "better"
    same = metrics.compare(run, run)["exact_match"]
    assert same["diff_ci"] == [0.0, 0.0] and not same["excludes_zero"]
    assert same["verdict"] == "no clear difference"
    # Seeded: the same values give the same interval on every call.
    values = [0.1, 0.5, 0.9, 0.3]
    assert metrics.bootstrap_ci(values, seed=3) == metrics.bootstrap_ci(values, seed=3)


def test_loss_is_token_weighted_and_lower_is_better():
    summary = metrics.summarise([], losses=[1.0, 2.0], tokens=[1, 3])
    assert summary["loss"] == pytest.approx(7 / 4) and summary["perplexity"] == pytest.approx(math.exp(7 / 4))
    lo, hi = summary["loss_ci"]
    assert 1.0 <= lo <= hi <= 2.0
    assert summary["perplexity_ci"] == pytest.approx([math.exp(lo), math.exp(hi)])
    diff = metrics.compare([], [], ([1.0, 1.0], [2, 2]), ([3.0, 3.5], [2, 2]))["loss"]
    assert diff["diff"] == pytest.approx(-2.25) and diff["verdict"] == "better" and diff["excludes_zero"]


def test_bad_rows_are_named_with_their_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "a", "expected": "b"}\n{"expected": "no prompt"}\n\n{"prompt": "x", "expected": 3}\n'
    )
    with pytest.raises(BackpropError) as err:
        read_eval_file(path)
    assert err.value.code == ErrorCode.DATASET_PARSE_FAILED
    assert f"{path}:2: needs a text prompt" in err.value.message
    assert f"{path}:4: needs a text expected" in err.value.message
    path.write_text('{"prompt": "a", "expected": "b", "regex": "("}\n')
    with pytest.raises(BackpropError, match="does not compile") as err:
        read_eval_file(path)
    path.write_text("")
    with pytest.raises(BackpropError) as err:
        read_eval_file(path)
    assert err.value.code == ErrorCode.DATASET_EMPTY


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", "eval", *args], capture_output=True, text=True, env=env
    )


def test_cli_refuses_bad_input_with_stable_codes(tmp_path, five_row_file):
    missing = _eval_cli("20990101-000000-dead", "--data", str(tmp_path / "missing.jsonl"))
    assert missing.returncode == 1 and missing.stderr.startswith("[DATASET_NOT_FOUND]"), missing.stderr
    assert "missing.jsonl" in missing.stderr and "hint:" in missing.stderr
    no_prompt = tmp_path / "no-prompt.jsonl"
    no_prompt.write_text('{"question": "a", "expected": "b"}\n')
    bad = _eval_cli("20990101-000000-dead", "--data", str(no_prompt), "--json")
    assert bad.returncode == 1
    error = json.loads(bad.stdout)["error"]
    assert error["code"] == "DATASET_PARSE_FAILED" and ":1: needs a text prompt" in error["message"]
    unknown = _eval_cli("20990101-000000-dead", "--data", str(five_row_file))
    assert unknown.returncode == 1 and unknown.stderr.startswith("[STATE_RUN_NOT_FOUND]"), unknown.stderr
