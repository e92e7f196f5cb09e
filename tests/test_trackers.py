"""Experiment trackers are sinks of the event stream; each is read back with the tracker's own reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backpropagate.config import RunConfig
from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.trackers import REQUIREMENTS, check_trackers

REPO = Path(__file__).resolve().parent.parent


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_tensorboard_holds_the_runs_loss_series(home):
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    out = subprocess.run(
        [sys.executable, "-m", "backpropagate", "train", "--data", str(REPO / "examples" / "quickstart.jsonl"),
         "--steps", "6", "--max-seq-len", "64", "--eval-fraction", "0", "--report-to", "tensorboard", "--json"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = home / "runs" / json.loads(out.stdout)["run_id"]
    steps = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    losses = [(e["step"], e["loss"]) for e in steps if e["type"] == "step"]
    read = scalars(run_dir / "tensorboard", "train/loss")
    assert [s for s, _ in read] == [s for s, _ in losses]
    assert [v for _, v in read] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert len(scalars(run_dir / "tensorboard", "train/lr")) == len(losses)


def test_report_to_accepts_a_list_or_comma_text_and_refuses_unknown_names():
    assert RunConfig(data="x", report_to="tensorboard").report_to == ["tensorboard"]
    assert RunConfig(data="x").report_to == []
    with pytest.raises(BackpropError) as info:
        RunConfig.parse({"data": "x", "report_to": ["nosuch"]})
    assert info.value.code == ErrorCode.CONFIG_INVALID and "report_to" in info.value.message


def test_a_missing_tracker_package_names_its_install_command(monkeypatch):
    monkeypatch.setitem(REQUIREMENTS, "tensorboard", ("no_such_tracker_pkg", "pip install no-such-tracker"))
    with pytest.raises(BackpropError) as info:
        check_trackers(["tensorboard"])
    assert info.value.code == ErrorCode.DEP_TRACKER_MISSING and "pip install no-such-tracker" in info.value.hint


@pytest.mark.slow
def test_a_worker_run_feeds_tensorboard_too(home, tmp_path):
    """The web app's path: the worker process writes the same scalars."""
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    run_dir = tmp_path / "20261202-000000-tbtb"
    run_dir.mkdir()
    config = RunConfig(data=str(REPO / "examples" / "quickstart.jsonl"), steps=4, max_seq_len=64,
                       eval_fraction=0.0, report_to=["tensorboard"])  # fmt: skip
    config.save(run_dir / "config.json")
    out = subprocess.run(
        [sys.executable, "-m", "backpropagate.worker", str(run_dir)], capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, (run_dir / "worker.log").read_text()[-3000:]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert [v for _, v in scalars(run_dir / "tensorboard", "train/loss")] == pytest.approx(losses, rel=1e-6)
