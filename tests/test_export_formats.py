"""Adapter and merged-weights exports, source resolution, push without a token, the export CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_export_support import llama_run, qwen2_run  # noqa: F401 - fixtures

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export import export_run
from backpropagate.export.source import resolve_source


def test_run_id_resolves_under_home_runs(qwen2_run: Path) -> None:  # noqa: F811
    src = resolve_source(qwen2_run.name)  # a bare id, not a path
    assert src.run_dir == qwen2_run.resolve()
    assert src.adapter_dir == qwen2_run.resolve() / "adapter"
    assert src.default_output_root == qwen2_run.resolve() / "exports"
    with pytest.raises(BackpropError) as err:
        resolve_source("no-such-run")
    assert err.value.code == ErrorCode.STATE_RUN_NOT_FOUND


def test_adapter_export_has_weights_config_tokenizer_and_card(qwen2_run: Path, tmp_path: Path) -> None:  # noqa: F811
    result = export_run(qwen2_run.name, "adapter", output=tmp_path / "adapter")
    out = Path(result.path)
    names = set(result.files)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= names
    card = (out / "README.md").read_text()
    config = json.loads((qwen2_run / "config.json").read_text())
    assert f"base_model: {config['model']}" in card
    assert '"lora_r": 8' in card  # the run's configuration
    assert '"train_loss": 1.23' in card  # the run's metrics.json
    # The exported adapter loads with PEFT onto its base.
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out)).base_model_name_or_path == config["model"]


def test_merged_export_matches_the_adapter_model_and_shards(llama_run: Path, tmp_path: Path) -> None:  # noqa: F811
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from backpropagate.export.merge import export_merged

    src = resolve_source(llama_run)
    out = export_merged(src, tmp_path / "merged", dtype="f32", max_shard_size="1MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()

    ids = torch.tensor([[3, 50, 60, 70, 80]])
    base = AutoModelForCausalLM.from_pretrained(src.base_model, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(src.adapter_dir))(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
    assert torch.allclose(merged, with_adapter, atol=1e-4)
    assert not torch.allclose(merged, base_logits, atol=1e-3)  # the adapter really changed something


def test_merged_f16_halves_the_size(qwen2_run: Path, tmp_path: Path) -> None:  # noqa: F811
    f32 = export_run(qwen2_run, "merged", "f32", output=tmp_path / "f32")
    f16 = export_run(qwen2_run, "merged", "f16", output=tmp_path / "f16")

    def size(result: object) -> int:
        return sum(p.stat().st_size for p in Path(result.path).glob("*.safetensors"))

    assert 0.45 < size(f16) / size(f32) < 0.55
    assert json.loads((Path(f16.path) / "config.json").read_text())["dtype"] == "float16"


def test_bad_format_and_quantization_are_refused_before_work(qwen2_run: Path) -> None:  # noqa: F811
    for fmt, q in (("onnx", None), ("gguf", "q7_z"), ("merged", "q8_0")):
        with pytest.raises(BackpropError) as err:
            export_run(qwen2_run, fmt, q)  # type: ignore[arg-type]
        assert err.value.code == ErrorCode.CONFIG_INVALID_SETTING


def test_push_without_a_token_says_how_to_log_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backpropagate.export.push import push

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved login either
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "README.md").write_text("x")
    with pytest.raises(BackpropError) as err:
        push(tmp_path / "export", "someone/model")
    assert err.value.code == ErrorCode.DEP_HUB_PUSH_FAILED
    assert "HF_TOKEN" in err.value.hint


def test_cli_export_and_push_errors(qwen2_run: Path, tmp_path: Path) -> None:  # noqa: F811
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_TOKEN", None)
    backprop = [sys.executable, "-c", "from backpropagate.cli import main; main()"]
    out = subprocess.run(
        [*backprop, "export", qwen2_run.name, "--format", "adapter", "-o", str(tmp_path / "a"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["format"] == "adapter"
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()

    pushed = subprocess.run(
        [*backprop, "push", str(tmp_path / "a"), "--repo", "me/model"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert pushed.returncode == 1
    assert "[DEP_HUB_PUSH_FAILED]" in pushed.stderr and "hint:" in pushed.stderr

    # The base model is exported as GGUF only: the flag reaches export_run, which says so.
    base = subprocess.run(
        [*backprop, "export", qwen2_run.name, "--format", "merged", "--base-model"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert base.returncode == 1
    assert "[CONFIG_INVALID_SETTING]" in base.stderr and "base model" in base.stderr
