"""The whole path with the real engine: API -> scheduler -> worker -> tiny demo model -> WebSocket.

Uses the session's BACKPROPAGATE_HOME so the demo models are built once for every test.
"""

from __future__ import annotations

import json

import pytest
from test_api_server import REPO_EXAMPLES, Server, _collect, _kill_workers

from backpropagate.events import read_events

pytestmark = pytest.mark.slow


def test_real_engine_run_streams_stops_and_resumes(home):
    server = Server(home, engine=True).start()
    try:
        config = {
            "model": "demo", "data": str(REPO_EXAMPLES / "quickstart.jsonl"), "steps": 6, "save_every": 2,
            "max_seq_len": 64, "batch_size": 2, "grad_accum": 1, "eval_fraction": 0, "device": "cpu",
        }  # fmt: skip
        resp = server.post("/api/runs", json=config)
        assert resp.status_code == 201, resp.text
        run_id = resp.json()["id"]
        with server.ws(run_id) as ws:
            first = []
            for message in ws:
                event = json.loads(message)
                if event["type"] == "heartbeat":
                    continue
                first.append(event)
                if event["type"] == "step" and event["step"] == 3:
                    assert server.post(f"/api/runs/{run_id}/stop").status_code == 200
                if event["type"] in ("completed", "failed", "cancelled"):
                    break
        assert first[-1]["type"] == "cancelled", first[-1]
        stopped = server.wait_status(run_id, {"cancelled"}, timeout=180)
        saved = [e["step"] for e in first if e["type"] == "checkpoint"]
        assert saved and saved[-1] == first[-1]["step"] and stopped["step"] == saved[-1]

        assert server.post(f"/api/runs/{run_id}/resume").status_code == 200
        with server.ws(run_id, after=first[-1]["seq"]) as ws:
            rest = _collect(ws)
        assert [e["seq"] for e in first + rest] == list(range(1, rest[-1]["seq"] + 1))
        started = next(e for e in rest if e["type"] == "run_started")
        assert started["resumed_from_step"] == saved[-1]
        steps_after = [e["step"] for e in rest if e["type"] == "step"]
        assert steps_after == list(range(saved[-1] + 1, 7))
        assert rest[-1]["type"] == "completed"
        final = server.wait_status(run_id, {"completed"}, timeout=180)
        assert final["step"] == 6 and final["final_metrics"]["final_loss"] > 0
        on_disk = [e.model_dump(mode="json") for e in read_events(home / "runs" / run_id / "events.jsonl")]
        assert on_disk == first + rest
        metrics = server.get(f"/api/runs/{run_id}/metrics", params={"max_points": 0}).json()
        assert [p["step"] for p in metrics["steps"]] == list(range(1, 7))
        assert server.get(f"/api/runs/{run_id}/log", params={"tail": 5}).json()["lines"]
    finally:
        server.stop()
        _kill_workers(home)
