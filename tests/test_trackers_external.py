"""W&B, MLflow and Trackio sinks, each read back with the tracker's own reader (offline, no network).

The packages are optional (the `trackers` extra); a test skips, saying which, when one is absent.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from backpropagate.events import Completed, Eval, Gpu, GpuDevice, RunStarted, Step
from backpropagate.trackers import open_trackers

REPO = Path(__file__).resolve().parent.parent
RUN_ID = "20261202-000000-trk1"
LOSSES = [2.5, 2.25, 2.0, 1.75]


def _events() -> list:
    out = [RunStarted(pid=1, config={"model": "demo", "lr": 2e-4, "lora": {"r": 8}}, total_steps=4)]
    for i, loss in enumerate(LOSSES, start=1):
        out.append(Step(step=i, total_steps=4, epoch=i / 4, loss=loss, lr=1e-4 * i, grad_norm=0.5))
        if i == 2:
            out.append(Gpu(devices=[GpuDevice(index=0, temperature_c=61.0, memory_used_mb=900.0)]))
    out.append(Eval(step=4, loss=1.9, perplexity=6.7))
    out.append(Completed(step=4, final_loss=1.75, metrics={"train_loss": 2.1, "eval_loss": 1.9}))
    return [e.model_copy(update={"run_id": RUN_ID, "seq": n, "ts": 1.8e9 + n}) for n, e in enumerate(out, 1)]


def _feed(name: str, run_dir: Path) -> None:
    class Config:
        report_to = [name]

    trackers = open_trackers(Config(), run_dir)
    for event in _events():
        trackers.on_event(event)
    assert list(trackers.sinks) == [name]  # no sink failed on the way
    trackers.close()


# ---------------------------------------------------------------- W&B run files


def wandb_records(run_file: Path) -> list:
    """Records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log chunks of protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start a record
        if kind in (1, 4):  # full or last: the record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def test_wandb_offline_run_files_hold_the_loss_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb, or the trackers extra)")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    _feed("wandb", tmp_path)
    rows = wandb_history(tmp_path)
    train = [r for r in rows if "train/loss" in r]
    assert [r["train/step"] for r in train] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in train] == pytest.approx(LOSSES)
    assert [r["eval/loss"] for r in rows if "eval/loss" in r] == [pytest.approx(1.9)]
    assert [r["gpu0/temperature_c"] for r in rows if "gpu0/temperature_c" in r] == [61.0]
    (run_folder,) = tmp_path.glob("wandb/offline-run-*")
    assert run_folder.name.endswith(RUN_ID)  # the W&B run id is the run id: a resume continues it
    records = wandb_records(next(run_folder.glob("run-*.wandb")))
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}  # fmt: skip
    assert config["lora"] == {"r": 8} and config["model"] == "demo"
    summary = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}  # fmt: skip
    assert summary["final/eval_loss"] == pytest.approx(1.9)


# ---------------------------------------------------------------- MLflow file store


def test_mlflow_file_store_holds_the_loss_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip(
        "mlflow", reason="mlflow is not installed (pip install mlflow-skinny, or the trackers extra)"
    )
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in for a file: URI of one's own
    _feed("mlflow", tmp_path / "run")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == RUN_ID
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == list(
        zip([1, 2, 3, 4], LOSSES, strict=True)
    )
    assert run.data.metrics["eval/perplexity"] == pytest.approx(6.7)
    assert run.data.metrics["final/train_loss"] == pytest.approx(2.1)
    assert run.data.params["lora.r"] == "8" and run.data.params["model"] == "demo"


def test_mlflow_defaults_to_a_file_store_in_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip(
        "mlflow", reason="mlflow is not installed (pip install mlflow-skinny, or the trackers extra)"
    )
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    _feed("mlflow", tmp_path)  # the sink allows the file store it chose itself
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("backpropagate").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == len(LOSSES)


# ---------------------------------------------------------------- Trackio


def test_trackio_database_holds_the_loss_series(tmp_path: Path) -> None:
    pytest.importorskip(
        "trackio", reason="trackio is not installed (pip install trackio, or the trackers extra)"
    )
    # Trackio reads TRACKIO_DIR when imported: feed and read back in a fresh process.
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from test_trackers_external import _feed, RUN_ID
from pathlib import Path
_feed("trackio", Path({str(tmp_path)!r}))
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps(SQLiteStorage.get_logs("backpropagate", RUN_ID)))
"""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    env.pop("TRACKIO_PROJECT", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = json.loads(out.stdout.strip().splitlines()[-1])
    train = [row for row in logs if "train/loss" in row]
    assert [row["step"] for row in train] == [1, 2, 3, 4]
    assert [row["train/loss"] for row in train] == pytest.approx(LOSSES)


@pytest.mark.slow
def test_a_run_feeds_every_tracker_its_loss_series(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`backprop train --report-to wandb,mlflow,trackio`, offline: each reader gives the step events' losses."""
    for module in ("wandb", "mlflow", "trackio"):
        pytest.importorskip(module, reason=f"{module} is not installed (the trackers extra)")
    from mlflow.tracking import MlflowClient

    from backpropagate.models.demo import resolve_model

    resolve_model("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    env.update(
        OMP_NUM_THREADS="1", WANDB_MODE="offline", TRACKIO_DIR=str(tmp_path / "trackio"), HF_HUB_OFFLINE="1"
    )
    out = subprocess.run(
        [sys.executable, "-m", "backpropagate", "train", "--data", str(REPO / "examples" / "quickstart.jsonl"),
         "--steps", "4", "--max-seq-len", "64", "--eval-fraction", "0", "--report-to", "wandb,mlflow,trackio",
         "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = json.loads(out.stdout)["run_id"]  # stdout is still only the JSON result
    run_dir = home / "runs" / run_id
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    losses = [(e["step"], e["loss"]) for e in events if e["type"] == "step"]
    assert len(losses) == 4

    rows = [r for r in wandb_history(run_dir) if "train/loss" in r]
    assert [(r["train/step"], r["train/loss"]) for r in rows] == losses

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the store the run chose
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("backpropagate").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == losses

    script = (
        "import json; from trackio.sqlite_storage import SQLiteStorage; "
        f"print(json.dumps(SQLiteStorage.get_logs('backpropagate', {run_id!r})))"
    )
    read = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    logs = json.loads(read.stdout.strip().splitlines()[-1])
    assert [(r["step"], r["train/loss"]) for r in logs if "train/loss" in r] == losses
