"""`backprop estimate-vram` as a user runs it: the page's estimate and a table of cards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from backpropagate.training.memory import estimate_memory, shape_from_config

QWEN_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
           "intermediate_size": 18944, "vocab_size": 152064}  # fmt: skip


def backprop(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args], capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=120,
    )  # fmt: skip


def test_estimate_of_a_model_folder_matches_the_estimate_and_the_cards(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN_7B))
    out = backprop("estimate-vram", "--model", str(tmp_path), "--seq", "2048", "--batch", "1", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    want = estimate_memory(shape_from_config(QWEN_7B), method="lora", seq_len=2048, micro_batch=1)
    assert report["estimate"]["total_gib"] == want.total_gib
    fits = {c["card"]: c["fits"] for c in report["cards"]}
    assert fits["RTX 3090 / 4090"] is False and fits["A100 / H100 80GB"] is True
    assert fits["A100 40GB"] == (want.total_gib <= 40 * 0.92)
    h200 = next(c for c in report["cards"] if c["card"] == "H200")
    assert h200["largest_micro_batch"] >= 2


def test_qlora_and_checkpointing_fit_a_smaller_card(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN_7B))
    out = backprop("estimate-vram", "-m", str(tmp_path), "--method", "qlora", "--gradient-checkpointing", "--json")
    fits = {c["card"]: c["fits"] for c in json.loads(out.stdout)["cards"]}
    assert fits["RTX 3090 / 4090"] is True


def test_table_for_the_demo_model():
    out = backprop("estimate-vram", "--model", "demo")
    assert out.returncode == 0, out.stderr
    assert "total" in out.stdout and "H200" in out.stdout and "largest micro-batch" in out.stdout


def test_hub_id_from_the_local_cache_and_offline_without_one(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(QWEN_7B))
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub")}
    cached = backprop("estimate-vram", "--model", "org/tiny", "--json", env=env)
    assert cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout)["parameters"] > 7e9
    missing = backprop("estimate-vram", "--model", "org/absent", env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("[DEP_MODEL_LOAD_FAILED]")


def test_bad_values_are_refused_with_a_code(tmp_path: Path):
    out = backprop("estimate-vram", "--method", "dpo")
    assert out.returncode == 1 and out.stderr.startswith("[CONFIG_INVALID]")
