"""Runs trained in the foreground (`backprop train`, `Trainer`) are in the store, whichever door."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from test_training_cli import ENV, REPO, backprop

from backpropagate.runs.store import open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(home) -> None:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")


def listed() -> dict[str, dict]:
    out = backprop("runs", "list", "--json")
    assert out.returncode == 0, out.stderr
    return {row["id"]: row for row in json.loads(out.stdout)}


def test_cli_run_is_listed_while_it_trains_and_after(demo, home, tmp_path):
    before = set(listed())
    child = subprocess.Popen(
        [sys.executable, "-m", "backpropagate", "train", "--data", str(REPO / "examples" / "quickstart.jsonl"),
         "--steps", "200", "--max-seq-len", "64", "--eval-fraction", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    seen_running = None
    deadline = time.time() + 240
    while time.time() < deadline and child.poll() is None:
        rows = open_store().list_runs(["running"])  # polled in-process: a CLI call per poll is slow
        running = [r.model_dump() for r in rows if r.id not in before and r.step > 0]
        if running:
            seen_running = running[0]
            break
        time.sleep(0.1)
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr[-3000:]
    result = json.loads(stdout)
    assert seen_running is not None and seen_running["id"] == result["run_id"]
    after = listed()[result["run_id"]]
    assert after["status"] == "completed" and after["step"] == 200 and after["loss"] is not None


def test_python_trainer_run_is_listed(demo, home):
    from backpropagate import Trainer

    result = Trainer("demo", max_seq_len=64, eval_fraction=0.0).train(REPO / "examples" / "quickstart.jsonl", steps=3)
    row = listed()[result.run_id]
    assert row["status"] == "completed" and row["step"] == 3


def test_failing_train_ends_failed_with_its_code_and_watch_returns(demo, home, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' + "not json\n")
    before = set(listed())
    out = backprop("train", "--data", str(bad), "--steps", "2")
    assert out.returncode == 1
    code = re.search(r"^\[([A-Z_]+)\]", out.stderr, re.M).group(1)
    (run_id,) = set(listed()) - before
    row = listed()[run_id]
    assert row["status"] == "failed" and row["error_code"] == code
    events = [json.loads(line) for line in (home / "runs" / run_id / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "failed" and events[-1]["code"] == code
    watched = backprop("watch", run_id, timeout=60)
    assert watched.returncode == 1 and f"[{code}]" in watched.stderr
