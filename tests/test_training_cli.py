"""`backprop train` as a user runs it: a subprocess, progress on stderr, the result on stdout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def backprop(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args], capture_output=True, text=True, env=ENV, **kw
    )


@pytest.fixture(scope="module")
def demo(home) -> None:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")


def test_quickstart_with_defaults(demo, home):
    started = time.time()
    out = backprop(
        "train", "--model", "demo", "--data", str(REPO / "examples" / "quickstart.jsonl"), cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-3000:]
    adapter = Path(out.stdout.split("adapter: ")[1].strip())
    assert (adapter / "adapter_model.safetensors").is_file() and adapter.parent.parent == home / "runs"
    assert "step 150/150" in out.stderr and "loss" in out.stderr  # the progress bar went to stderr
    metrics = json.loads((adapter.parent / "metrics.json").read_text())
    events = [json.loads(line) for line in (adapter.parent / "events.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert metrics["steps"] == 150 and len(losses) == 150 and losses[-1] < losses[0] / 3  # visibly learns
    assert time.time() - started < 300
    # The README's promise: the default demo run visibly learns the quickstart answers.
    assert "seven days" in _answer(adapter, "How many days are in a week?")


def _answer(adapter: Path, question: str) -> str:
    """Greedy reply of the base demo model with the trained adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from backpropagate.models.demo import resolve_model
    from backpropagate.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(adapter))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model("demo")), str(adapter))
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    out = model.eval().generate(ids, max_new_tokens=20, do_sample=False)
    return tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True)


def test_ctrl_c_checkpoints_and_resume_finishes(demo, home, tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Count to {i}."},
                      {"role": "assistant", "content": " ".join(str(n) for n in range(1, i + 1))}]}
        for i in range(1, 9)
    ]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = set((home / "runs").glob("*")) if (home / "runs").exists() else set()
    args = ["--data", str(data), "--steps", "40", "--batch-size", "2", "--grad-accum", "1",
            "--max-seq-len", "64", "--no-packing", "--eval-fraction", "0", "--save-every", "100"]  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-m", "backpropagate", "train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    deadline = time.time() + 240
    run_dir = None
    while time.time() < deadline:
        new = set((home / "runs").glob("*")) - before
        if new:
            run_dir = new.pop()
            log = run_dir / "events.jsonl"
            if log.exists() and '"type":"step"' in log.read_text():
                break
        assert child.poll() is None, child.communicate()[1][-3000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)

    assert child.returncode == 130, stderr[-3000:]
    assert f"backprop train --resume {run_dir.name}" in stdout
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    cancelled = events[-1]
    assert cancelled["type"] == "cancelled" and 1 <= cancelled["step"] < 40
    assert Path(cancelled["checkpoint"]).is_dir()

    out = backprop("train", "--resume", run_dir.name, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["status"] == "completed" and result["step"] == 40
    assert result["resumed_from_step"] == cancelled["step"] and len(result["history"]) == 40


def test_invalid_options_exit_1_with_the_code():
    out = backprop("train", "--data", "x.jsonl", "--lr", "5", "--lora-r", "0")
    assert out.returncode == 1
    assert out.stderr.startswith("[CONFIG_INVALID]") and "lr" in out.stderr and "lora_r" in out.stderr
    assert "hint:" in out.stderr
    missing = backprop("train", "--resume", "20990101-000000-dead")
    assert missing.returncode == 1 and missing.stderr.startswith("[STATE_RUN_NOT_FOUND]")
