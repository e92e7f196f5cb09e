"""The run page's view of an event log: replay, bounded charts, timeline, ETA, config diffs."""

from __future__ import annotations

import json
from pathlib import Path

from backpropagate.events import (
    Checkpoint,
    Completed,
    EventLog,
    Gpu,
    GpuDevice,
    OomRecovered,
    RunStarted,
    Step,
)
from backpropagate.events import Warning_ as WarningEvent
from ui_app.state.runview import RunView, config_diff, downsample, error_doc_url, format_duration, gpu_card


def _write_log(path: Path, steps: int) -> list[dict]:
    with EventLog(path, "r1") as log:
        log.append(RunStarted(pid=1, total_steps=steps, device="cpu", config={"name": "a"}))
        for i in range(1, steps + 1):
            log.append(
                Step(step=i, total_steps=steps, epoch=i / steps, loss=5.0 / i, lr=1e-4, tokens_per_s=100.0)
            )
        log.append(Checkpoint(step=steps, path="ck", bytes=2048))
        log.append(OomRecovered(step=3, old_micro_batch=4, new_micro_batch=2, grad_accum=8))
        log.append(WarningEvent(code="RUNTIME_GPU_OOM", message="tight"))
        log.append(Completed(step=steps, final_loss=0.5))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_replay_in_pieces_equals_replay_at_once(tmp_path: Path) -> None:
    events = _write_log(tmp_path / "events.jsonl", 30)
    whole = RunView()
    for ev in events:
        whole.apply(ev)
    pieces = RunView()
    for ev in events[:10] + events[5:20] + events[15:]:  # overlapping replays, as after a reconnect
        pieces.apply(ev)
    assert pieces.chart_points() == whole.chart_points()
    assert [p["step"] for p in whole.chart_points()] == list(range(1, 31))
    assert whole.status == "completed" and whole.final["final_loss"] == 0.5
    assert pieces.timeline == whole.timeline


def test_timeline_names_checkpoints_oom_and_links_error_codes(tmp_path: Path) -> None:
    view = RunView()
    for ev in _write_log(tmp_path / "events.jsonl", 3):
        view.apply(ev)
    texts = [t["text"] for t in view.timeline]
    assert any("Checkpoint at step 3 (2 KB)" in t for t in texts)
    assert any("micro-batch 4 → 2" in t for t in texts)
    warning = next(t for t in view.timeline if t["kind"] == "warning")
    assert warning["code"] == "RUNTIME_GPU_OOM"
    assert warning["url"].endswith("error-codes.md#runtime_gpu_oom") and warning["url"] == error_doc_url(
        "RUNTIME_GPU_OOM"
    )
    assert view.micro_batch == 2


def test_resumed_run_replaces_repeated_steps() -> None:
    view = RunView()
    for seq, step in enumerate([1, 2, 3, 4, 3, 4, 5], start=1):  # resumed from the checkpoint at step 2
        view.apply(
            {
                "type": "step",
                "seq": seq,
                "step": step,
                "total_steps": 5,
                "epoch": 0,
                "loss": float(seq),
                "lr": 0.1,
            }
        )
    assert [p["step"] for p in view.chart_points()] == [1, 2, 3, 4, 5]
    assert view.chart_points()[2]["loss"] == 5.0  # the newer value for step 3


def test_chart_is_bounded_and_keeps_extremes() -> None:
    rows = [{"step": i, "loss": 1.0} for i in range(1, 10001)]
    rows[5000]["loss"] = 99.0  # a spike must survive downsampling
    out = downsample(rows, 1000)
    assert len(out) <= 1000
    assert out[0]["step"] == 1 and out[-1]["step"] == 10000
    assert any(r["loss"] == 99.0 for r in out)
    assert [r["step"] for r in out] == sorted(r["step"] for r in out)


def test_eta_and_progress_from_step_times() -> None:
    view = RunView()
    view.apply({"type": "run_started", "seq": 1, "ts": 100.0, "pid": 1, "total_steps": 10})
    for i in range(1, 5):
        view.apply(
            {
                "type": "step",
                "seq": i + 1,
                "ts": 100.0 + 2 * i,
                "step": i,
                "total_steps": 10,
                "epoch": 0,
                "loss": 1.0,
                "lr": 0.1,
            }
        )
    assert view.eta_s == 12.0  # 2 s a step, 6 steps left
    assert view.progress_pct == 40
    assert view.summary()["eta"] == "12s"
    assert format_duration(3725) == "1h 02m" and format_duration(None) == ""


def test_gpu_card_levels_against_thresholds() -> None:
    dev = GpuDevice(
        index=0,
        name="H100",
        temperature_c=91,
        memory_used_mb=40960,
        memory_total_mb=81920,
        utilization_pct=97,
        power_w=650,
    )
    card = gpu_card(Gpu(devices=[dev]).devices[0].model_dump())
    assert card["level"] == "critical" and card["vram_pct"] == 50 and card["vram"] == "40.0 / 80.0 GiB"
    assert gpu_card({"index": 1, "temperature_c": 82})["level"] == "warm"
    assert gpu_card({"index": 1, "temperature_c": 60})["level"] == "ok"


def test_config_diff_lists_only_differences() -> None:
    rows = config_diff({"a": {"lr": 0.1, "name": "x", "seed": 1}, "b": {"lr": 0.2, "name": "x", "seed": 1}})
    assert rows == [{"field": "lr", "a": "0.1", "b": "0.2"}]
