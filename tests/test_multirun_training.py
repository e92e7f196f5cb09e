"""Multi-run on the tiny demo model: validation per run, a failing validation, a crash and its resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from backpropagate.config import RunConfig
from backpropagate.training import run_training
from backpropagate.training.control import RunControl
from backpropagate.training.multirun import Schedule, start_multi_run, validation_loss

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory, home) -> Path:
    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    folder = home / "multirun-test"  # inside BACKPROPAGATE_HOME: the API accepts data there
    folder.mkdir(exist_ok=True)
    path = folder / "rows.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is item {i}?"},
                      {"role": "assistant", "content": f"Item {i} is number {i * 7 % 13}."}]}
        for i in range(30)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(data: Path) -> RunConfig:
    return RunConfig(
        model="demo", data=str(data), packing=False, max_seq_len=64, batch_size=4, grad_accum=1, lr=3e-3,
        lora_r=8, lora_alpha=16, lr_scheduler="constant", warmup_ratio=0.0, seed=0, save_every=2,
    )  # fmt: skip


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_validation_loss_per_run_and_a_failing_validation_leaves_training_going(rows_file):
    calls = []

    def flaky_validation(cfg, adapter, holdout):
        calls.append(adapter.name)
        if adapter.name == "run-02":
            raise RuntimeError("validation broke")
        return validation_loss(cfg, adapter, holdout)

    schedule = Schedule(
        num_runs=3, steps_per_run=4, samples_per_run=8, early_stopping=False, track_forgetting=True
    )
    result = start_multi_run(config(rows_file), schedule, validate=flaky_validation)

    assert result.status == "completed" and [r["index"] for r in result.runs] == [1, 2, 3]
    assert calls == ["run-01", "run-02", "run-03"]
    vals = [r["val_loss"] for r in result.runs]
    assert vals[0] > 0 and vals[1] is None and vals[2] > 0  # the broken one is a gap, not the end
    assert [r["lambda"] for r in result.runs] == pytest.approx([1.0, 2**-0.5, 3**-0.5])
    # Forgetting: after run k, the merge's loss on the chunk of every run so far.
    assert [sorted(r["chunk_loss"]) for r in result.runs] == [["run-01"], ["run-01", "run-02"],
                                                               ["run-01", "run-02", "run-03"]]  # fmt: skip
    manifest = json.loads((result.run_dir / "multirun.json").read_text())
    assert manifest["holdout"] == 3 and manifest["chunks"] == [8, 8, 8]
    assert [r["val_loss"] for r in manifest["runs"]] == vals
    events = events_of(result.run_dir)
    evals = [e for e in events if e["type"] == "eval"]
    assert [(e["step"], e["loss"]) for e in evals] == [(4, vals[0]), (12, vals[2])]
    warning = next(e for e in events if e["type"] == "warning")
    assert (
        "Validation after run 2 failed" in warning["message"] and "training continues" in warning["message"]
    )
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps == list(range(1, 13)) and events[-1]["type"] == "completed"
    # The published adapter is the best validated merge, and it is a normal run's adapter.
    best = min((v, i) for i, v in enumerate(vals, start=1) if v is not None)[1]
    assert manifest["adapter"]["from_run"] == best == result.best_run
    adapter = load_file(str(result.adapter_path / "adapter_model.safetensors"))
    merged = load_file(str(result.run_dir / "merged" / f"run-{best:02d}" / "adapter_model.safetensors"))
    assert adapter.keys() == merged.keys() and all(adapter[k].equal(merged[k]) for k in adapter)
    # Holdout rows never reached a chunk file.
    holdout = (result.run_dir / "data" / "holdout.jsonl").read_text().splitlines()
    for k in (1, 2, 3):
        assert not set(holdout) & set(
            (result.run_dir / "data" / f"run-{k:02d}.jsonl").read_text().splitlines()
        )


def test_crash_at_run_two_resumes_at_run_two_with_the_merged_adapter(rows_file):
    trained: list[str] = []
    state = {"crash": True}

    def crashing(cfg, sub_dir, emit, control):
        trained.append(sub_dir.name)
        if sub_dir.name == "run-02" and state["crash"]:
            # Crash mid-run: two real steps and their checkpoint, then the process dies.
            stop = RunControl()

            def stop_after_two(event):
                emit(event)
                if event.type == "step" and event.step == 2:
                    stop.request_stop("user")

            assert run_training(cfg, sub_dir, stop_after_two, stop).status == "cancelled"
            raise RuntimeError("worker killed")
        return run_training(cfg, sub_dir, emit, control)

    schedule = Schedule(
        num_runs=3, steps_per_run=4, samples_per_run=8, early_stopping=False, validate_every_run=False
    )
    with pytest.raises(RuntimeError, match="worker killed"):
        start_multi_run(config(rows_file), schedule, train=crashing)
    from backpropagate.settings import get_settings

    run_dir = max((get_settings().runs_dir).glob("*/multirun.json"), key=lambda p: p.stat().st_mtime).parent
    manifest = json.loads((run_dir / "multirun.json").read_text())
    assert [r["index"] for r in manifest["runs"]] == [1] and events_of(run_dir)[-1]["type"] == "failed"
    first_events = (run_dir / "runs" / "run-01" / "events.jsonl").read_text()
    # Run 2 starts from the merge of run 1: its B, and SLAO's orthogonal basis of its A.
    init = load_file(str(run_dir / "init" / "run-02" / "adapter_model.safetensors"))
    merged1 = load_file(str(run_dir / "merged" / "run-01" / "adapter_model.safetensors"))
    b_keys = [k for k in init if ".lora_B." in k]
    assert b_keys and all(init[k].equal(merged1[k]) for k in b_keys)
    sub2 = RunConfig.load(run_dir / "runs" / "run-02" / "config.json")
    assert sub2.init_adapter == str(run_dir / "init" / "run-02")

    state["crash"], trained[:] = False, []
    result = start_multi_run(RunConfig(data="(resumed)"), schedule, resume=run_dir.name, train=crashing)
    assert result.status == "completed" and trained == ["run-02", "run-03"]  # run 1 is not trained again
    assert [r["index"] for r in result.runs] == [1, 2, 3]
    assert (run_dir / "runs" / "run-01" / "events.jsonl").read_text() == first_events
    # Run 2 went on from its own checkpoint at step 2 rather than starting over.
    started = [e for e in events_of(run_dir / "runs" / "run-02") if e["type"] == "run_started"]
    assert [e["resumed_from_step"] for e in started] == [None, 2]
    assert result.runs[1]["steps"] == 4
    resumed = [e for e in events_of(run_dir) if e["type"] == "run_started"]
    assert resumed[-1]["resumed_from_step"] == 4  # one run of four steps was already merged


def test_api_run_with_a_schedule_is_a_multi_run(home, rows_file):
    from test_api_server import Server, _kill_workers

    server = Server(home, engine=True).start()
    try:
        body = config(rows_file).model_dump(mode="json") | {
            "device": "cpu",
            "multi_run": {"num_runs": 2, "steps_per_run": 3, "samples_per_run": 8, "early_stopping": False},
        }
        resp = server.post("/api/runs", json=body)
        assert resp.status_code == 201, resp.text
        run_id = resp.json()["id"]
        final = server.wait_status(run_id, {"completed", "failed"}, timeout=240)
        assert final["status"] == "completed", final
        run_dir = home / "runs" / run_id
        manifest = json.loads((run_dir / "multirun.json").read_text())
        assert [r["index"] for r in manifest["runs"]] == [1, 2] and all(
            r["val_loss"] > 0 for r in manifest["runs"]
        )
        assert RunConfig.load(run_dir / "config.json").multi_run.num_runs == 2
        assert RunConfig.load(run_dir / "runs" / "run-02" / "config.json").multi_run is None
        steps = [e["step"] for e in events_of(run_dir) if e["type"] == "step"]
        assert steps == [1, 2, 3, 4, 5, 6] and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    finally:
        server.stop()
        _kill_workers(home)
