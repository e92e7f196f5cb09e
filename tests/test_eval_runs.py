"""`backprop eval` and POST /api/runs/{id}/evals on a run trained on a memorisation set (tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FACTS = [
    ("What colour is the sky?", "The sky is blue."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What do cats say?", "Cats say meow."),
    ("How many legs has a dog?", "A dog has four legs."),
    ("Where do fish live?", "Fish live in water."),
    ("What is ice?", "Ice is frozen water."),
    ("When do we sleep?", "We sleep at night."),
    ("What grows on trees?", "Leaves grow on trees."),
]


def backprop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args], capture_output=True, text=True, env=ENV
    )


@pytest.fixture(scope="module")
def memorised(home: Path, tmp_path_factory) -> dict:
    """A LoRA run that has learnt eight answers by heart, and the eval file that asks for them."""
    folder = home / "eval-test"  # inside BACKPROPAGATE_HOME: the API accepts paths there
    folder.mkdir(exist_ok=True)
    train = folder / "facts.jsonl"
    train.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n"
            for q, a in FACTS
        )
    )
    questions = folder / "questions.jsonl"
    questions.write_text("".join(json.dumps({"prompt": q, "expected": a}) + "\n" for q, a in FACTS))
    # Measured: 100 steps at these values take the loss from ~5 to ~0.4 and greedy answers are exact.
    done = backprop(
        "train", "--model", "demo", "--data", str(train), "--steps", "100", "--batch-size", "8",
        "--grad-accum", "1", "--lr", "3e-3", "--lr-scheduler", "constant", "--warmup-ratio", "0",
        "--lora-r", "32", "--lora-alpha", "64", "--eval-fraction", "0", "--no-packing",
        "--max-seq-len", "64", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    run_id = json.loads(done.stdout)["run_id"]
    return {"run_id": run_id, "run_dir": home / "runs" / run_id, "questions": questions}


def test_trained_run_beats_the_base_model_on_exact_match(memorised, capsys):
    out = backprop(
        "eval", memorised["run_id"], "--data", str(memorised["questions"]), "--vs", "base", "--json"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # exactly one JSON object on stdout
    run, base, diff = result["run"], result["vs"], result["diff"]
    for metric in ("exact_match", "contains", "token_f1"):
        assert 0 <= run[metric] <= 1 and len(run[f"{metric}_ci"]) == 2
    assert run["exact_match"] >= 0.75 and base["exact_match"] == 0.0, result["examples"]
    assert diff["exact_match"]["diff"] > 0 and diff["exact_match"]["excludes_zero"]
    assert diff["exact_match"]["diff_ci"][0] > 0
    assert run["loss"] < base["loss"] and run["perplexity"] == pytest.approx(2.718281828 ** run["loss"])
    assert len(result["examples"]) == len(FACTS)
    first = result["examples"][0]
    assert first["prompt"] == FACTS[0][0] and first["expected"] == FACTS[0][1]
    assert {"output", "vs_output", "scores", "vs_scores"} <= set(first)
    # The metrics are the means of the per-example scores shown.
    em = [e["scores"]["exact_match"] for e in result["examples"]]
    assert run["exact_match"] == pytest.approx(sum(em) / len(em))
    # Stored with the run, as printed.
    saved = Path(result["path"])
    assert saved.parent.parent == memorised["run_dir"] / "evals"
    assert json.loads(saved.read_text()) == result

    # The table a person reads, from the same result (the command prints it without --json).
    from backpropagate.cli.eval import print_result

    print_result(result)
    table = capsys.readouterr().out
    assert "exact match" in table and "yes (better)" in table
    assert "verdict: better than base on exact_match" in table


def test_api_evaluation_job_reports_progress_and_results(memorised, home):
    from fastapi.testclient import TestClient

    from backpropagate.server.app import create_app

    run_id = memorised["run_id"]
    with TestClient(create_app(gpu_indices=[])) as client:
        refused = client.post(f"/api/runs/{run_id}/evals", json={"data": "/etc/hostname"})
        assert refused.status_code == 403 and refused.json()["code"] == "INPUT_PATH_TRAVERSAL"
        unknown = client.post("/api/runs/20990101-000000-dead/evals", json={})
        assert unknown.status_code == 404 and unknown.json()["code"] == "STATE_RUN_NOT_FOUND"

        started = client.post(f"/api/runs/{run_id}/evals", json={"data": str(memorised["questions"])})
        assert started.status_code == 202, started.text
        eval_id = started.json()["id"]
        seen_progress = set()
        deadline = time.time() + 240
        while (state := client.get(f"/api/runs/{run_id}/evals/{eval_id}").json())["status"] == "running":
            seen_progress.add(state["progress"])
            assert time.time() < deadline, state
            time.sleep(0.3)
        assert state["status"] == "completed", state
        assert state["progress"] == 1.0 and state["verdict"] is None  # nothing compared with
        assert state["result"]["run"]["exact_match"] >= 0.75 and state["result"]["vs"] is None
        assert (memorised["run_dir"] / "evals" / eval_id / "result.json").is_file()
        assert all(0 <= p < 1 for p in seen_progress)
        listed = client.get(f"/api/runs/{run_id}/evals").json()
        assert eval_id in [e["id"] for e in listed] and all(e["result"] is None for e in listed)
        missing = client.get(f"/api/runs/{run_id}/evals/eval-20990101-000000-abcdef")
        assert missing.status_code == 404 and missing.json()["code"] == "STATE_NOT_FOUND"
