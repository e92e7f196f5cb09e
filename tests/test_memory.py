"""The memory estimator's arithmetic on real model shapes (no weights needed)."""

import pytest

from backpropagate.training.memory import GiB, ModelShape, auto_batch, estimate_memory, shape_from_config

QWEN_05B = {
    "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
}  # fmt: skip
QWEN_7B = {
    "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False,
}  # fmt: skip


def test_parameter_counts_match_published_sizes():
    # Published sizes (without q/k/v biases): 0.49B and 7.6B.
    assert shape_from_config(QWEN_05B).n_params == pytest.approx(494e6, rel=0.01)
    assert shape_from_config(QWEN_7B).n_params == pytest.approx(7.6e9, rel=0.01)


def test_lora_params_all_linear():
    shape = ModelShape(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=1000)
    # per layer: q(256+256) k(256+128) v(256+128) o(256+256) gate(256+512) up(256+512) down(512+256), r=8
    per_layer = 8 * (512 + 384 + 384 + 512 + 768 + 768 + 768)
    assert shape.lora_params(8) == 2 * per_layer


def test_components_add_up_and_weights_are_bf16():
    shape = shape_from_config(QWEN_7B)
    est = estimate_memory(shape, seq_len=2048, micro_batch=2)
    assert est.weights_gib == pytest.approx(shape.n_params * 2 / GiB)
    parts = est.weights_gib + est.trainable_gib + est.activations_gib + est.logits_gib
    assert est.total_gib == pytest.approx(parts * 1.10 + est.overhead_gib)


def test_methods_and_options_order_memory_as_expected():
    shape = shape_from_config(QWEN_7B)
    kw = {"seq_len": 2048, "micro_batch": 2}
    lora, qlora, full = (estimate_memory(shape, method=m, **kw).total_gib for m in ("lora", "qlora", "full"))
    assert qlora < lora < full
    plain = estimate_memory(shape, **kw)
    ckpt = estimate_memory(shape, gradient_checkpointing=True, **kw)
    fused = estimate_memory(shape, fused_loss=True, **kw)
    assert ckpt.activations_gib < plain.activations_gib / 10
    assert fused.logits_gib < plain.logits_gib / 10
    # activations grow linearly with the micro-batch
    four = estimate_memory(shape, seq_len=2048, micro_batch=4)
    assert four.activations_gib == pytest.approx(2 * plain.activations_gib)


def test_auto_batch_fits_and_prefers_no_checkpointing_when_it_can():
    shape = shape_from_config(QWEN_05B)
    est = auto_batch(shape, 80, seq_len=2048)
    assert est.total_gib <= 80 * 0.92 and not est.gradient_checkpointing and est.micro_batch >= 4
    bigger = estimate_memory(shape, seq_len=2048, micro_batch=est.micro_batch * 2)
    assert not bigger.fits(80 * 0.92) or est.micro_batch * 2 > 64 or est.micro_batch * 2048 >= 16384


def test_auto_batch_uses_checkpointing_when_memory_is_tight():
    shape = shape_from_config(QWEN_7B)
    est = auto_batch(shape, 24, seq_len=2048)
    assert est.gradient_checkpointing and est.total_gib <= 24


def test_auto_batch_falls_back_to_the_smallest_setting():
    est = auto_batch(shape_from_config(QWEN_7B), 4, seq_len=2048)
    assert est.micro_batch == 1 and est.gradient_checkpointing and not est.fits(4)
