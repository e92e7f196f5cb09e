"""Packing and collation: every example kept once, positions restart, and no cross-contamination."""

from __future__ import annotations

import random

import pytest
import torch

from backpropagate.data.packing import collate, pack, packing_efficiency
from backpropagate.data.tokenize import IGNORE


def make_examples(lengths, seed=0, vocab=100):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        # Train on the second half of each example, as a response would be.
        labels = [IGNORE] * (n // 2) + ids[n // 2 :]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_pack_keeps_every_example_once_within_max_len():
    lengths = [random.Random(1).randint(1, 60) for _ in range(200)]
    examples = make_examples(lengths)
    packed = pack(examples, 64)
    assert all(len(p["input_ids"]) <= 64 for p in packed)
    assert sorted(n for p in packed for n in p["seq_lens"]) == sorted(lengths)
    # Reassemble the examples from the packed rows: the multiset of token sequences is unchanged.
    pieces = []
    for p in packed:
        assert sum(p["seq_lens"]) == len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"])
        start = 0
        for n in p["seq_lens"]:
            assert p["position_ids"][start : start + n] == list(range(n))
            assert p["labels"][start] == IGNORE
            pieces.append(tuple(p["input_ids"][start : start + n]))
            start += n
    assert sorted(pieces) == sorted(tuple(e["input_ids"]) for e in examples)
    # Best-fit decreasing on this mix fills most of the space; sequential filling would not.
    assert packing_efficiency(packed, 64) > 0.95
    assert len(packed) == pytest.approx(sum(lengths) / 64, abs=3)


def test_pack_refuses_an_example_longer_than_max_len():
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        pack(make_examples([10, 70]), 64)


def test_collate_unpacked_pads_with_ignored_labels():
    batch = make_examples([3, 5])
    out = collate(batch, pad_id=0)
    assert out["input_ids"].shape == (2, 5)
    assert out["input_ids"][0].tolist() == batch[0]["input_ids"] + [0, 0]
    assert out["labels"][0].tolist()[3:] == [IGNORE, IGNORE]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert "position_ids" not in out


def test_collate_packed_builds_a_block_diagonal_causal_mask():
    row = pack(make_examples([2, 3]), 8)[0]
    out = collate([row], pad_id=0)
    allowed = (out["attention_mask"][0, 0] == 0).int().tolist()
    # seq 3 (positions 0-2), seq 2 (positions 3-4), then one padding row attending only to itself
    assert row["seq_lens"] == [3, 2]
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert out["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    padded = collate([row, pack(make_examples([7]), 8)[0]], pad_id=0, dtype=torch.bfloat16)
    assert padded["attention_mask"].dtype == torch.bfloat16 and padded["attention_mask"].shape == (2, 1, 7, 7)
    assert padded["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert padded["labels"][0, 5:].tolist() == [IGNORE, IGNORE]


def tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attention", ["4d", "position_ids"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logits_and_loss_equal_each_example_alone(attn, attention):
    model = tiny_llama(attn)
    examples = make_examples([5, 9, 3, 12, 7, 16, 2, 1], seed=3)
    packed = pack(examples, 20)
    assert any(len(p["seq_lens"]) > 1 for p in packed)
    batch = collate(packed, pad_id=0, attention=attention)
    assert ("attention_mask" in batch) == (attention == "4d")
    with torch.no_grad():
        # No cache: with one, transformers would not look for example boundaries in position_ids.
        out = model(**batch, use_cache=False)
        total_loss, total_tokens = 0.0, 0
        for r, row in enumerate(packed):
            start = 0
            for n in row["seq_lens"]:
                ids = torch.tensor([row["input_ids"][start : start + n]])
                labels = torch.tensor([row["labels"][start : start + n]])
                alone = model(input_ids=ids, labels=labels)
                assert torch.allclose(alone.logits[0], out.logits[r, start : start + n], atol=1e-5)
                trained = int((labels[0, 1:] != IGNORE).sum())
                if trained == 0:
                    start += n
                    continue
                total_loss += alone.loss.item() * trained
                total_tokens += trained
                start += n
    # The packed loss is the token-weighted mean of the examples' own losses.
    assert out.loss.item() == pytest.approx(total_loss / total_tokens, rel=1e-5)


def test_without_the_mask_packed_examples_do_contaminate_each_other():
    # The control for the test above: plain causal attention over a packed row leaks, and so
    # do position ids alone when a cache is in play (transformers then skips boundary detection).
    model = tiny_llama("sdpa")
    row = pack(make_examples([6, 6], seed=4), 12)[0]
    batch = collate([row], pad_id=0, attention="position_ids")
    with torch.no_grad():
        alone = model(input_ids=batch["input_ids"][:, 6:]).logits[0]
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0, 6:]
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, 6:]
    assert not torch.allclose(leaky, alone, atol=1e-3)
    assert not torch.allclose(cached, alone, atol=1e-3)


def test_segments_become_the_same_mask_after_the_move():
    from backpropagate.data.packing import segments_to_mask
    from backpropagate.training.evaluation import to_device

    packed = pack(make_examples([5, 9, 3, 12, 7, 16, 2, 1], seed=3), 20)
    direct = collate(packed, pad_id=0, dtype=torch.bfloat16)
    deferred = collate(packed, pad_id=0, attention="segments")
    assert "attention_mask" not in deferred and deferred["segment_ids"].shape == direct["input_ids"].shape
    moved = to_device(deferred, "cpu", torch.bfloat16)
    assert "segment_ids" not in moved
    assert torch.equal(moved["attention_mask"], direct["attention_mask"])
    assert torch.equal(moved["position_ids"], direct["position_ids"])
    # A batch without segment ids passes through unchanged.
    assert segments_to_mask({"input_ids": direct["input_ids"]}, torch.float32).keys() == {"input_ids"}


def test_pad_to_multiple_rounds_the_width_up_and_keeps_padding_apart():
    packed = pack(make_examples([5, 9, 3], seed=1), 20)
    out = collate(packed, pad_id=0, pad_to_multiple=16, dtype=torch.float32)
    assert out["input_ids"].shape[1] == 32
    assert (out["labels"][:, 20:] == IGNORE).all()
    allowed = out["attention_mask"][0, 0] == 0
    real = len(packed[0]["input_ids"])
    # No real token attends to padding, and padding positions restart at 0.
    assert not allowed[:real, real:].any()
    assert out["position_ids"][0, real].item() == 0
    unpacked = collate(make_examples([3, 5]), pad_id=0, pad_to_multiple=8)
    assert unpacked["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] * 5 + [0] * 3]
