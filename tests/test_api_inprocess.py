"""The app in-process (TestClient): heartbeats on idle sockets, and no torch in the server's imports."""

from __future__ import annotations

import json
import subprocess
import sys

from fastapi.testclient import TestClient
from test_worker_standin import standin_env

from backpropagate.settings import Settings


def test_server_modules_do_not_import_torch():
    probe = (
        "import sys; from backpropagate.server.app import create_app; create_app(); "
        "import backpropagate.worker, backpropagate.cli.runs; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_queued_run_socket_sends_heartbeats_then_streams(tmp_path, monkeypatch):
    for key, value in standin_env(BACKPROPAGATE_STANDIN_STEP_S="0.1").items():
        monkeypatch.setenv(key, value)
    from backpropagate.server.app import create_app

    app = create_app(Settings(home=tmp_path / "home"), heartbeat_s=0.2, gpu_indices=[])
    data = "d.jsonl"  # inside the uploads folder, where relative data paths resolve
    with TestClient(app) as client:
        (tmp_path / "home" / "datasets" / data).write_text('{"text": "hello"}\n')  # it must exist
        first = client.post("/api/runs", json={"data": data, "steps": 15}).json()
        second = client.post("/api/runs", json={"data": data, "steps": 2}).json()
        assert client.get(f"/api/runs/{second['id']}").json()["status"] == "queued"  # one CPU slot
        with client.websocket_connect(f"/api/runs/{second['id']}/events") as ws:
            messages = []
            while not messages or messages[-1].get("type") != "completed":
                messages.append(json.loads(ws.receive_text()))
        kinds = [m["type"] for m in messages]
        assert kinds[0] == "heartbeat" and "seq" not in messages[0]  # waited behind the first run
        events = [m for m in messages if m["type"] != "heartbeat"]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert client.get(f"/api/runs/{first['id']}").json()["status"] == "completed"
