"""Bad and edge requests against a real server process: catalogued 4xx answers, store left intact."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_api_server import Server, _kill_workers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("api") / "home"
    # One pretend GPU, so that asking for more than the machine has can be refused (runs here use the CPU).
    srv = Server(
        home,
        BACKPROPAGATE_STANDIN_STEP_S="0.05",
        BACKPROPAGATE_SERVER__MAX_UPLOAD_MB="1",
        BACKPROPAGATE_FAKE_GPUS="1",
    ).start()
    data = home / "datasets" / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    srv.data = str(data)
    yield srv
    srv.stop()
    _kill_workers(home)


def _error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == code and body["message"] and body["hint"]
    return body


def test_unknown_run_is_404_everywhere(server):
    for method, path in [
        ("GET", "/api/runs/nope"), ("POST", "/api/runs/nope/stop"), ("POST", "/api/runs/nope/resume"),
        ("POST", "/api/runs/nope/clone"), ("DELETE", "/api/runs/nope"), ("GET", "/api/runs/nope/metrics"),
        ("GET", "/api/runs/nope/checkpoints"), ("GET", "/api/runs/nope/log"), ("GET", "/api/runs/nope/exports"),
    ]:  # fmt: skip
        import httpx

        _error(httpx.request(method, server.url + path, timeout=10), 404, "STATE_RUN_NOT_FOUND")
    with connect(f"ws://127.0.0.1:{server.port}/api/runs/nope/events") as ws:
        first = json.loads(ws.recv())
        assert first["code"] == "STATE_RUN_NOT_FOUND"
        with pytest.raises(ConnectionClosed):
            ws.recv()
        assert ws.close_code == 4404
    _error(server.get("/api/no-such-route"), 404, "STATE_NOT_FOUND")


def test_bad_bodies_are_refused_and_store_is_intact(server):
    before = server.get("/api/runs").json()
    body = _error(
        server.post("/api/runs", json={"data": server.data, "lr": 5, "bogus": 1}), 422, "CONFIG_INVALID"
    )
    assert "lr" in body["message"] and "bogus" in body["message"]  # every problem at once
    _error(server.post("/api/runs", json={"steps": 3}), 422, "CONFIG_INVALID")  # data missing
    _error(
        server.post("/api/runs", content=b'{"data": ', headers={"content-type": "application/json"}),
        422, "INPUT_REQUEST_INVALID",
    )  # fmt: skip
    _error(server.post("/api/runs", json=["not", "an", "object"]), 422, "INPUT_REQUEST_INVALID")
    _error(server.get("/api/runs", params={"status": "bogus"}), 422, "INPUT_REQUEST_INVALID")
    _error(server.get("/api/runs/x/metrics", params={"max_points": -1}), 422, "INPUT_REQUEST_INVALID")
    _error(server.post("/api/runs", json={"data": "/etc/passwd"}), 403, "INPUT_PATH_TRAVERSAL")
    _error(server.post("/api/runs", json={"data": "../../../../etc/shadow"}), 403, "INPUT_PATH_TRAVERSAL")
    _error(server.post("/api/runs", json={"data": server.data, "model": "/etc"}), 403, "INPUT_PATH_TRAVERSAL")
    for out in ("/etc/backprop", "/usr/local/x", str(Path.home() / ".ssh" / "x")):
        _error(
            server.post("/api/runs", json={"data": server.data, "output_dir": out}),
            403,
            "UI_OUTPUT_DIR_FORBIDDEN",
        )
    # Refused at the door, not queued to fail later: an unknown upload, a missing file, too many GPUs.
    body = _error(server.post("/api/runs", json={"data": "ds-0123456789ab"}), 404, "DATASET_NOT_FOUND")
    assert "ds-0123456789ab" in body["message"]
    missing = str(server.home / "datasets" / "gone.jsonl")
    assert (
        "gone.jsonl"
        in _error(server.post("/api/runs", json={"data": missing}), 404, "DATASET_NOT_FOUND")["message"]
    )
    body = _error(
        server.post("/api/runs", json={"data": server.data, "gpus": 4}), 422, "CONFIG_GPUS_UNAVAILABLE"
    )
    assert body["details"] == {"gpus_requested": 4, "gpus_available": 1}
    assert server.get("/api/runs").json() == before
    assert not [p for p in (server.home / "runs").iterdir() if p.name not in {r["id"] for r in before}]
    # ... and the server still works.
    run = server.post("/api/runs", json={"data": server.data, "steps": 2, "device": "cpu"})
    assert run.status_code == 201
    server.wait_status(run.json()["id"], {"completed"})


def test_delete_refused_while_active_then_allowed(server):
    run = server.post("/api/runs", json={"data": server.data, "steps": 400, "device": "cpu"}).json()
    _error(server.delete(f"/api/runs/{run['id']}"), 409, "STATE_RUN_ACTIVE")
    _error(server.post(f"/api/runs/{run['id']}/resume"), 409, "STATE_RUN_NOT_RESUMABLE")
    server.post(f"/api/runs/{run['id']}/stop")
    server.wait_status(run["id"], {"cancelled"})
    assert server.delete(f"/api/runs/{run['id']}").status_code == 204
    _error(server.get(f"/api/runs/{run['id']}"), 404, "STATE_RUN_NOT_FOUND")
    assert not (server.home / "runs" / run["id"]).exists()


def test_uploads_type_size_preview_and_use_in_a_run(server):
    datasets = server.home / "datasets"
    before = set(os.listdir(datasets))
    _error(server.post("/api/datasets", files={"file": ("x.exe", b"MZ")}), 415, "INPUT_UPLOAD_TYPE")
    _error(server.post("/api/datasets", files={"file": ("../../evil.sh", b"#!")}), 415, "INPUT_UPLOAD_TYPE")
    big = b'{"text": "' + b"a" * (1024 * 1024 + 10) + b'"}\n'
    _error(server.post("/api/datasets", files={"file": ("big.jsonl", big)}), 413, "INPUT_UPLOAD_TOO_LARGE")
    assert set(os.listdir(datasets)) == before  # nothing half-written left behind
    rows = "".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(7))
    resp = server.post("/api/datasets", files={"file": ("../my data.jsonl", rows.encode())})
    assert resp.status_code == 201, resp.text
    up = resp.json()
    assert up["original_name"] == "my data.jsonl" and up["rows"] == 7 and up["format"] == "jsonl"
    stored = set(os.listdir(datasets)) - before
    assert stored == {f"{up['id']}.jsonl"}  # a generated name, never the client's
    assert up["id"] in [d["id"] for d in server.get("/api/datasets").json()]
    preview = server.get(f"/api/datasets/{up['id']}/preview", params={"rows": 3}).json()
    assert preview["rows"] == [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    _error(server.get("/api/datasets/ds-nope/preview"), 404, "DATASET_NOT_FOUND")
    report = server.get(f"/api/datasets/{up['id']}/validate", params={"model": "none"}).json()
    assert report["ok"] is True and report["rows"] == 7
    _error(
        server.get(f"/api/datasets/{up['id']}/validate", params={"model": "/etc"}),
        403,
        "INPUT_PATH_TRAVERSAL",
    )
    bad = server.post(
        "/api/datasets", files={"file": ("bad.jsonl", b'{"instruction": "q"}\nnot json\n')}
    ).json()
    report = server.get(f"/api/datasets/{bad['id']}/validate", params={"model": "none"}).json()
    assert report["ok"] is False and report["errors"]
    run = server.post("/api/runs", json={"data": up["id"], "steps": 2, "device": "cpu"}).json()
    assert run["config"]["data"] == str(datasets / f"{up['id']}.jsonl")
    server.wait_status(run["id"], {"completed"})


def test_models_list_and_add(server):
    models = server.get("/api/models").json()
    assert {"demo", "demo-llama", "demo-qwen2"} <= {m["id"] for m in models if m["kind"] == "demo"}
    assert server.post("/api/models", json={"id": "Qwen/Qwen2.5-0.5B-Instruct"}).status_code == 201
    assert {"id": "Qwen/Qwen2.5-0.5B-Instruct", "kind": "hub", "path": None} in server.get(
        "/api/models"
    ).json()
    _error(server.post("/api/models", json={"id": "../../etc"}), 422, "INPUT_REQUEST_INVALID")


def test_all_runs_socket_reports_status_changes(server):
    with connect(f"ws://127.0.0.1:{server.port}/api/events") as ws:
        run = server.post("/api/runs", json={"data": server.data, "steps": 3, "device": "cpu"}).json()
        seen: list[str] = []
        deadline = time.time() + 30
        while "completed" not in seen and time.time() < deadline:
            msg = json.loads(ws.recv(timeout=30))
            if msg.get("run_id") == run["id"]:
                seen.append(msg["status"])
    assert seen[-1] == "completed" and "running" in seen


def test_openapi_system_and_no_torch_in_server(server):
    spec = server.get("/api/openapi.json").json()
    assert {"/api/runs", "/api/runs/{run_id}/metrics", "/api/datasets", "/api/system"} <= set(spec["paths"])
    assert server.get("/api/docs").status_code == 200
    system = server.get("/api/system").json()
    assert system["packages"]["torch"] and system["server"]["gpu_indices"] == [0]  # the pretend GPU
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps and "torch/_C" not in maps


def test_headless_server_refuses_foreign_hosts_and_cross_site_requests(server):
    import httpx

    _error(server.get("/api/runs", headers={"Host": "evil.example"}), 421, "AUTH_HOST_FORBIDDEN")
    _error(
        server.post("/api/runs/x/stop", headers={"Origin": "http://evil.example"}),
        403,
        "AUTH_ORIGIN_FORBIDDEN",
    )
    same = httpx.get(server.url + "/api/runs", headers={"Origin": server.url}, timeout=10)
    assert same.status_code == 200
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{server.port}/api/events", origin="http://evil.example").close()
    assert refused.value.response.status_code == 403
