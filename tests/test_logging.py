"""Logging is configured from Settings in every process: a real worker writes its log lines to
RUN_DIR/worker.log, bound to its run id, as JSON when BACKPROPAGATE_LOG_JSON is on, and
BACKPROPAGATE_LOG_LEVEL decides what is written.

The worker loads the engine below (BACKPROPAGATE_ENGINE=test_logging:run_training): it logs
through a plain ``get_logger`` (no run id passed) at three levels, then completes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from backpropagate.events import Completed, RunStarted
from backpropagate.logs import get_logger

TESTS = Path(__file__).resolve().parent
RUN_ID = "20260101-000000-logs"


def run_training(config, run_dir, emit, control=None):
    log = get_logger("backpropagate.engine")
    emit(RunStarted(pid=os.getpid(), total_steps=1, device="cpu"))
    log.debug("engine debug line")
    log.info("engine info line")
    log.warning("engine warning line")
    emit(Completed(step=1, final_loss=1.0))
    return {"step": 1}


def _run_worker(tmp_path: Path, **settings: str) -> str:
    run_dir = tmp_path / "runs" / RUN_ID
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"data": "x.jsonl", "steps": 1}))
    env = {
        **os.environ,
        "BACKPROPAGATE_ENGINE": "test_logging:run_training",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")])),
        **settings,
    }
    proc = subprocess.run([sys.executable, "-m", "backpropagate.worker", str(run_dir)], env=env, timeout=120)
    assert proc.returncode == 0, (run_dir / "worker.log").read_text()
    return (run_dir / "worker.log").read_text()


def test_worker_writes_json_lines_bound_to_its_run_id(tmp_path: Path) -> None:
    text = _run_worker(tmp_path, BACKPROPAGATE_LOG_JSON="true", BACKPROPAGATE_LOG_LEVEL="INFO")
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    messages = [r["msg"] for r in records]
    assert "engine info line" in messages and "engine warning line" in messages
    assert any(m.startswith("worker started") for m in messages)
    assert all(r["run_id"] == RUN_ID for r in records), records
    assert {"ts", "level", "logger"} <= set(records[0])


def test_log_level_setting_changes_what_the_worker_writes(tmp_path: Path) -> None:
    debug = _run_worker(tmp_path / "debug", BACKPROPAGATE_LOG_LEVEL="DEBUG")
    warning = _run_worker(tmp_path / "warning", BACKPROPAGATE_LOG_LEVEL="WARNING")
    assert "engine debug line" in debug and "engine info line" in debug
    assert f"run_id={RUN_ID}" in debug
    assert "engine warning line" in warning
    assert "engine debug line" not in warning and "engine info line" not in warning


def test_text_lines_by_default(tmp_path: Path) -> None:
    text = _run_worker(tmp_path, BACKPROPAGATE_LOG_JSON="false", BACKPROPAGATE_LOG_LEVEL="INFO")
    line = next(line for line in text.splitlines() if "engine info line" in line)
    assert not line.startswith("{") and f"run_id={RUN_ID}" in line and "INFO" in line


def test_api_server_logs_json_lines_from_settings(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "BACKPROPAGATE_HOME": str(tmp_path),
        "BACKPROPAGATE_LOG_JSON": "true",
        "BACKPROPAGATE_LOG_LEVEL": "DEBUG",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "backpropagate", "serve-api", "--port", str(port)],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        records = []
        for line in proc.stderr:  # uvicorn's own lines are text; ours are JSON
            if line.startswith("{"):
                records.append(json.loads(line))
            if any(r["msg"].startswith("server started") for r in records):
                break
    finally:
        proc.terminate()
        proc.wait(30)
    assert any(r["msg"].startswith("logging configured: level=DEBUG") for r in records)
