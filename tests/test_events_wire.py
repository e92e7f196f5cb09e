"""Every WebSocket message is a model of events.py: events, heartbeats, run status, deletions, refusals."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from backpropagate.events import (
    HEARTBEAT_JSON,
    Error,
    Heartbeat,
    RunDeleted,
    RunStatusMessage,
    Step,
    parse_wire,
)
from backpropagate.runs.hub import run_status_message
from backpropagate.runs.store import Run
from backpropagate.settings import Settings


def test_each_kind_of_message_parses_to_its_model():
    step = Step(run_id="r", seq=3, step=1, total_steps=2, epoch=0.5, loss=1.0, lr=0.1)
    assert parse_wire(step.model_dump_json()) == step
    assert isinstance(parse_wire(HEARTBEAT_JSON), Heartbeat)
    status = run_status_message(Run(id="r", status="running", step=4, total_steps=9, loss=0.5))
    assert parse_wire(status.model_dump_json()) == status and isinstance(status, RunStatusMessage)
    assert isinstance(parse_wire({"type": "run_deleted", "run_id": "r", "ts": 1.0}), RunDeleted)
    with pytest.raises(ValueError):
        parse_wire({"type": "run_status", "run_id": "r"})  # no status: not a message of ours


def test_unknown_run_is_refused_with_an_error_event_of_seq_0(tmp_path):
    from backpropagate.server.app import create_app

    app = create_app(Settings(home=tmp_path / "home"), gpu_indices=[])
    with TestClient(app) as client, client.websocket_connect("/api/runs/nope/events") as ws:
        refusal = parse_wire(ws.receive_text())
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert isinstance(refusal, Error) and refusal.seq == 0 and refusal.code == "STATE_RUN_NOT_FOUND"
    assert closed.value.code == 4404
