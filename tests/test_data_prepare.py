"""prepare_datasets: deterministic split, stats, packing on and off, and data set fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.data.packing import collate
from backpropagate.data.prepare import dataset_fingerprint, prepare_datasets
from backpropagate.data.tokenize import IGNORE
from backpropagate.errors import BackpropError, ErrorCode

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def tok():
    from backpropagate.models.demo import build_tokenizer

    return build_tokenizer()


def rows_text(tok, rows):
    return sorted(tok.decode(r["input_ids"]) for r in rows)


def test_split_is_deterministic_by_seed_and_disjoint(tok):
    cfg = RunConfig(data=str(EXAMPLES / "sharegpt.jsonl"), eval_fraction=0.2, packing=False, seed=1)
    a = prepare_datasets(cfg, tok)
    b = prepare_datasets(cfg, tok)
    c = prepare_datasets(cfg.model_copy(update={"seed": 2}), tok)
    assert a.train == b.train and a.eval == b.eval
    assert rows_text(tok, a.eval) != rows_text(tok, c.eval)
    assert len(a.eval) == 6 and len(a.train) == 24
    assert not set(rows_text(tok, a.train)) & set(rows_text(tok, a.eval))
    assert a.stats.rows == 30 and a.stats.train_examples == 24 and a.stats.eval_examples == 6
    assert a.stats.train_sequences == 24 and a.stats.packing_efficiency is None


def test_packing_keeps_every_token_and_reports_stats(tok):
    base = {"data": str(EXAMPLES / "sharegpt.jsonl"), "eval_fraction": 0.0, "max_seq_len": 256}
    plain = prepare_datasets(RunConfig(**base, packing=False), tok)
    packed = prepare_datasets(RunConfig(**base, packing=True), tok)
    assert packed.stats.train_sequences < plain.stats.train_sequences
    assert (
        sum(len(r["input_ids"]) for r in packed.train)
        == plain.stats.train_tokens
        == packed.stats.train_tokens
    )
    trained = sum(sum(x != IGNORE for x in r["labels"]) for r in packed.train)
    assert trained == packed.stats.trained_tokens
    assert all(len(r["input_ids"]) <= 256 and "seq_lens" in r for r in packed.train)
    assert 0.5 < packed.stats.packing_efficiency <= 1.0
    batch = collate(packed.train[:2], pad_id=tok.pad_token_id)
    assert batch["attention_mask"].ndim == 4 and batch["input_ids"].shape[0] == 2


def test_truncation_is_counted_and_rows_without_responses_dropped(tok, tmp_path):
    long_prompt = " ".join(["word"] * 200)
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello " * 30}]},
        {"messages": [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]},
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_datasets(RunConfig(data=str(f), eval_fraction=0, max_seq_len=32, packing=False), tok)
    assert prepared.stats.truncated == 2 and prepared.stats.dropped_no_labels == 1
    assert len(prepared.train) == 2 and all(len(r["input_ids"]) <= 32 for r in prepared.train)


def test_separate_eval_data_and_skipped_rows(tok):
    cfg = RunConfig(
        data=str(EXAMPLES / "bad_rows.jsonl"),
        eval_data=str(EXAMPLES / "quickstart.jsonl"),
        skip_bad_rows=True,
        packing=False,
    )
    prepared = prepare_datasets(cfg, tok)
    assert prepared.stats.skipped == 6 and [i.line for i in prepared.skipped] == [3, 4, 5, 6, 7, 8]
    assert len(prepared.train) == 4 and len(prepared.eval) == 12
    with pytest.raises(BackpropError) as exc:
        prepare_datasets(cfg.model_copy(update={"skip_bad_rows": False}), tok)
    assert exc.value.code == ErrorCode.DATASET_PARSE_FAILED


def test_text_and_preference_prepare_for_sft(tok):
    for name in ("text.jsonl", "preference.jsonl", "alpaca.csv", "openai.parquet"):
        prepared = prepare_datasets(RunConfig(data=str(EXAMPLES / name), eval_fraction=0.1), tok)
        assert prepared.train and prepared.eval and prepared.stats.trained_tokens > 0


def test_fingerprint_follows_file_bytes(tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    shutil.copy(EXAMPLES / "quickstart.jsonl", src / "a.jsonl")
    first = dataset_fingerprint(src)
    assert first == dataset_fingerprint([src]) and len(first) == 64
    assert dataset_fingerprint(src / "a.jsonl") != dataset_fingerprint(EXAMPLES / "text.jsonl")
    with (src / "a.jsonl").open("a") as fh:
        fh.write('{"text": "one more"}\n')
    assert dataset_fingerprint(src) != first
    assert (
        dataset_fingerprint("org/name") == dataset_fingerprint("org/name") != dataset_fingerprint("org/other")
    )
