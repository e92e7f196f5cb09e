"""Exports through the API against a real server: a real run on the demo model, export subprocesses,
GGUF downloads, and chat through a real llama.cpp server behind /api/chat."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_api_server import REPO_EXAMPLES, Server, _free_port, _kill_workers
from test_export_ollama import FakeOllama

pytestmark = pytest.mark.slow
pytest.importorskip("llama_cpp")

TINY_RUN = {
    "model": "demo", "data": str(REPO_EXAMPLES / "quickstart.jsonl"), "steps": 2, "max_seq_len": 64,
    "batch_size": 2, "grad_accum": 1, "eval_fraction": 0, "device": "cpu",
}  # fmt: skip


@pytest.fixture(scope="module")
def api(home: Path):
    # Ollama registration goes to a port where nothing listens, so it fails for real.
    server = Server(home, engine=True, OLLAMA_HOST=f"127.0.0.1:{_free_port()}").start()
    try:
        yield server
    finally:
        server.stop()
        _kill_workers(home)


@pytest.fixture(scope="module")
def run_id(api: Server) -> str:
    resp = api.post("/api/runs", json={**TINY_RUN, "name": "export-me"})
    assert resp.status_code == 201, resp.text
    run = api.wait_status(resp.json()["id"], {"completed", "failed"}, timeout=240)
    assert run["status"] == "completed", run
    return run["id"]


def _export(api: Server, run_id: str, **body) -> dict:
    resp = api.post(f"/api/runs/{run_id}/exports", json=body)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "running" and job["run_id"] == run_id
    return job


def _wait(api: Server, export_id: str, timeout: float = 300) -> tuple[dict, list[str]]:
    """Poll until the export ends; returns its final state and every stage seen on the way."""
    stages: list[str] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = api.get(f"/api/exports/{export_id}").json()
        if state["stage"] and state["stage"] not in stages:
            stages.append(state["stage"])
        if state["status"] != "running":
            return state, stages
        assert 0.0 <= state["progress"] < 1.0
        time.sleep(0.2)
    raise AssertionError(f"export {export_id} still running after {timeout} s: {state}")


def _error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["code"] == code, body
    assert body["message"] and body["hint"]
    return body


def test_gguf_q8_0_export_runs_in_the_background_and_downloads(api: Server, run_id: str) -> None:
    job = _export(api, run_id, format="gguf", quantization="q8_0", verify=True)
    assert job["id"].startswith("gguf-q8_0-") and job["progress"] < 1.0
    state, stages = _wait(api, job["id"])
    assert state["status"] == "completed", state
    assert state["progress"] == 1.0 and state["error"] is None
    assert set(stages) <= {"merge", "convert", "verify"} and stages  # no quantize stage for q8_0
    report = state["verification"]
    assert report is not None and report["passed"] is True, report

    files = {f["name"]: f["bytes"] for f in state["files"]}
    gguf = next(name for name in files if name.endswith(".gguf"))
    assert Path(state["path"]).name == gguf and "Modelfile" in files and "result.json" in files
    assert not any(name.startswith(".") for name in files)  # the job's own files are not offered

    resp = api.get(f"/api/exports/{job['id']}/download", params={"file": gguf})
    assert resp.status_code == 200
    assert resp.content[:4] == b"GGUF" and len(resp.content) == files[gguf]

    listed = api.get(f"/api/runs/{run_id}/exports").json()
    assert any(r["format"] == "gguf-q8_0" and r["path"] == state["path"] for r in listed)
    jobs = api.get("/api/exports", params={"run_id": run_id}).json()
    assert job["id"] in [j["id"] for j in jobs]


def test_download_refuses_paths_and_unknown_files(api: Server, run_id: str) -> None:
    jobs = api.get("/api/exports", params={"run_id": run_id}).json()
    export_id = jobs[0]["id"]
    for name in ("../config.json", "../../events.jsonl", "/etc/passwd", ".job.json/../x", ".."):
        resp = api.get(f"/api/exports/{export_id}/download", params={"file": name})
        _error(resp, 403, "INPUT_PATH_TRAVERSAL")
    _error(
        api.get(f"/api/exports/{export_id}/download", params={"file": ".job.json"}), 404, "STATE_NOT_FOUND"
    )
    _error(
        api.get(f"/api/exports/{export_id}/download", params={"file": "nope.gguf"}), 404, "STATE_NOT_FOUND"
    )
    _error(api.get("/api/exports/no-such-export"), 404, "STATE_NOT_FOUND")
    _error(api.get("/api/exports/..%2F..%2Fetc"), 404, "STATE_NOT_FOUND")


def test_f16_export_serves_and_chat_streams_through_the_api(api: Server, run_id: str) -> None:
    job = _export(api, run_id, format="gguf", quantization="f16", verify=False)
    state, _ = _wait(api, job["id"])
    assert state["status"] == "completed", state
    assert any("verification skipped" in w for w in state["warnings"])

    def serve() -> httpx.Response:
        return httpx.post(f"{api.url}/api/exports/{job['id']}/serve", timeout=180)

    with ThreadPoolExecutor(2) as pool:  # two pages asking at once still share one server
        first, second = pool.map(lambda _: serve(), range(2))
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    base_url = first.json()["base_url"]
    assert base_url.startswith("http://127.0.0.1:") and second.json()["base_url"] == base_url
    assert serve().json()["base_url"] == base_url  # reused while it runs
    assert api.get(f"/api/exports/{job['id']}").json()["base_url"] == base_url

    body = {"export_id": job["id"], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12}
    pieces, ended = [], None
    with httpx.stream("POST", f"{api.url}/api/chat", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event is None:
                    pieces.append(data["text"])
                else:
                    ended = (event, data)
                event = None
    assert ended == ("done", {}), ended
    assert len(pieces) >= 2 and "".join(pieces).strip()  # streamed piece by piece

    assert api.delete(f"/api/exports/{job['id']}/serve").status_code == 204
    assert api.get(f"/api/exports/{job['id']}").json()["base_url"] is None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base_url}/v1/models", timeout=2)


def test_refusals_unknown_run_bad_request_and_unservable_export(api: Server, run_id: str) -> None:
    _error(api.post("/api/runs/no-such-run/exports", json={"format": "gguf"}), 404, "STATE_RUN_NOT_FOUND")
    bad = api.post(f"/api/runs/{run_id}/exports", json={"format": "gguf", "quantization": "q9_z"})
    assert "q9_z" in _error(bad, 422, "CONFIG_INVALID_SETTING")["message"]
    _error(api.post(f"/api/runs/{run_id}/exports", json={"format": "onnx"}), 422, "INPUT_REQUEST_INVALID")

    adapter = _export(api, run_id, format="adapter")
    state, _ = _wait(api, adapter["id"])
    assert state["status"] == "completed" and "adapter_config.json" in [f["name"] for f in state["files"]]
    _error(api.post(f"/api/exports/{adapter['id']}/serve"), 404, "STATE_NOT_FOUND")


def test_export_of_an_active_run_is_refused(api: Server) -> None:
    resp = api.post("/api/runs", json={**TINY_RUN, "steps": 400, "name": "busy"})
    assert resp.status_code == 201, resp.text
    busy = resp.json()["id"]
    try:
        refused = api.post(f"/api/runs/{busy}/exports", json={"format": "gguf"})
        body = _error(refused, 409, "STATE_RUN_ACTIVE")
        assert busy in body["message"]
    finally:
        api.post(f"/api/runs/{busy}/stop")
        api.wait_status(busy, {"cancelled", "completed", "failed"}, timeout=240)


def test_a_failing_export_job_records_its_error(api: Server, run_id: str, home: Path) -> None:
    weights = home / "runs" / run_id / "adapter" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    try:
        job = _export(api, run_id, format="merged", quantization="f16")
        state, _ = _wait(api, job["id"])
    finally:
        weights.write_bytes(original)
    assert state["status"] == "failed", state
    error = state["error"]
    assert error["code"] and error["message"] and error["hint"]
    assert state["ended_at"] is not None


def test_a_failed_ollama_registration_keeps_the_gguf_and_reports_the_error(api: Server, run_id: str) -> None:
    job = _export(api, run_id, format="gguf", quantization="f16", verify=False, ollama_name="tiny-demo")
    state, stages = _wait(api, job["id"])
    assert state["status"] == "failed", state
    assert state["error"]["code"] == "DEP_OLLAMA_REGISTRATION_FAILED"
    assert "did not answer" in state["error"]["message"] and state["error"]["hint"]
    assert stages[-1] == "ollama" and state["stage"] == "ollama"
    assert any(f["name"].endswith(".gguf") for f in state["files"])  # what was made is still offered
    _error(
        api.post("/api/runs/x/exports", json={"format": "adapter", "ollama_name": "m"}),
        404,
        "STATE_RUN_NOT_FOUND",
    )
    bad = api.post(f"/api/runs/{run_id}/exports", json={"format": "adapter", "ollama_name": "m"})
    _error(bad, 422, "CONFIG_INVALID_SETTING")


def test_the_base_model_export_is_made_once_per_quantization(api: Server, run_id: str) -> None:
    job = _export(api, run_id, format="gguf", quantization="f16", verify=True, base_model=True)
    assert job["id"].startswith("gguf-f16-base-") and job["base_model"] is True
    again = _export(api, run_id, format="gguf", quantization="f16", verify=True, base_model=True)
    assert again["id"] == job["id"]  # a running base export is followed, not started twice
    state, stages = _wait(api, job["id"])
    assert state["status"] == "completed", state
    assert "merge" not in stages  # the base is read as it is: no adapter merge
    gguf = Path(state["path"])
    assert gguf.name == f"{run_id}-base-f16.gguf"
    report = state["verification"]  # checked against the base model, which it must match closely
    assert report is not None and report["passed"] is True and report["mean_kl"] < 1e-3, report
    resp = api.get(f"/api/exports/{job['id']}/download", params={"file": gguf.name})
    assert resp.status_code == 200 and resp.content[:4] == b"GGUF"

    cached = _export_cached(api, run_id, format="gguf", quantization="f16", base_model=True)
    assert cached["id"] == job["id"] and cached["status"] == "completed" and cached["progress"] == 1.0
    trained = next(
        j
        for j in api.get("/api/exports", params={"run_id": run_id}).json()
        if j["status"] == "completed" and j["quantization"] == "f16" and not j["base_model"]
    )
    assert Path(trained["path"]).read_bytes() != gguf.read_bytes()  # the adapter is left out
    assert any(r["format"] == "gguf-f16-base" for r in api.get(f"/api/runs/{run_id}/exports").json())

    other = _export(api, run_id, format="gguf", quantization="q8_0", verify=False, base_model=True)
    assert other["id"] != job["id"] and other["id"].startswith("gguf-q8_0-base-")
    assert api.delete(f"/api/exports/{other['id']}").status_code == 204
    bad = api.post(f"/api/runs/{run_id}/exports", json={"format": "merged", "base_model": True})
    assert "gguf" in _error(bad, 422, "CONFIG_INVALID_SETTING")["message"]


def _export_cached(api: Server, run_id: str, **body) -> dict:
    resp = api.post(f"/api/runs/{run_id}/exports", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_ollama_registration_through_a_job_reaches_the_daemon(
    api: Server, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backpropagate.export.jobs import ExportJobs
    from backpropagate.runs.store import Run
    from backpropagate.settings import Settings

    ollama = FakeOllama()  # records what a real daemon would be sent
    monkeypatch.setenv("OLLAMA_HOST", ollama.url)  # the job process inherits it
    jobs = ExportJobs(Settings(home=api.home))
    try:
        state = jobs.start(Run(id=run_id, status="completed"), "gguf", "f16", False, "tiny-demo")
        deadline = time.monotonic() + 300
        while state["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
            state = jobs.status(state["id"])
    finally:
        ollama.close()
    assert state["status"] == "completed", state
    assert state["ollama_name"] == "tiny-demo" and state["error"] is None
    created = ollama.models["tiny-demo"]
    digest = next(iter(created["files"].values()))
    assert ollama.blobs[digest] == Path(state["path"]).read_bytes()  # the GGUF itself was uploaded
    assert [r["path"] for r in ollama.requests][-1] == "/api/create"


def test_an_export_process_that_dies_is_reported_failed(api: Server, run_id: str, home: Path) -> None:
    job = _export(api, run_id, format="gguf", quantization="f16")
    job_file = home / "runs" / run_id / "exports" / job["id"] / ".job.json"
    os.killpg(json.loads(job_file.read_text())["pid"], signal.SIGKILL)
    state, _ = _wait(api, job["id"], timeout=30)
    assert state["status"] == "failed" and state["error"]["code"] == "RUNTIME_INTERNAL"
    assert "exited without a result" in state["error"]["message"]


def test_deleting_exports_cancels_running_jobs_and_forgets_finished_ones(
    api: Server, run_id: str, home: Path
) -> None:
    running = _export(api, run_id, format="gguf", quantization="f16", verify=False)
    folder = home / "runs" / run_id / "exports" / running["id"]
    pid = json.loads((folder / ".job.json").read_text())["pid"]
    assert api.delete(f"/api/exports/{running['id']}").status_code == 204
    assert not folder.exists() and not Path(f"/proc/{pid}").exists()  # stopped and reaped
    _error(api.get(f"/api/exports/{running['id']}"), 404, "STATE_NOT_FOUND")

    done = _export(api, run_id, format="adapter")
    state, _ = _wait(api, done["id"])
    recorded = [r["path"] for r in api.get(f"/api/runs/{run_id}/exports").json()]
    assert state["path"] in recorded
    assert api.delete(f"/api/exports/{done['id']}").status_code == 204
    assert state["path"] not in [r["path"] for r in api.get(f"/api/runs/{run_id}/exports").json()]
    assert len(api.get(f"/api/runs/{run_id}/exports").json()) == len(recorded) - 1
    _error(api.delete(f"/api/exports/{done['id']}"), 404, "STATE_NOT_FOUND")


def test_a_restarted_server_finds_exports_and_stops_its_model_servers(api: Server, run_id: str) -> None:
    jobs = api.get("/api/exports", params={"run_id": run_id}).json()
    f16 = next(j for j in jobs if j["quantization"] == "f16" and j["status"] == "completed")
    api.stop()  # a real restart: one server a home (the second would be refused while it runs)
    second = Server(api.home, engine=True).start()
    try:
        again = second.get(f"/api/exports/{f16['id']}").json()  # read back from the export's folder
        assert again["status"] == "completed" and again["files"] == f16["files"]
        base_url = httpx.post(f"{second.url}/api/exports/{f16['id']}/serve", timeout=180).json()["base_url"]
        # It answers, and refuses a caller without the key only the app holds (docs/security.md).
        assert httpx.get(f"{base_url}/v1/models", timeout=5).status_code == 401
    finally:
        second.stop()
    assert second.proc is not None and second.proc.returncode is not None
    with pytest.raises(httpx.TransportError):  # the app's shutdown stopped the model server
        httpx.get(f"{base_url}/v1/models", timeout=2)


def test_runs_without_weights_or_unfinished_are_not_exportable(tmp_path: Path) -> None:
    from backpropagate.errors import BackpropError
    from backpropagate.export.jobs import ExportJobs, weights_source
    from backpropagate.runs.store import Run
    from backpropagate.settings import Settings

    jobs = ExportJobs(Settings(home=tmp_path))
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    for status, code in [("failed", "STATE_RUN_NOT_EXPORTABLE"), ("interrupted", "STATE_RUN_NOT_EXPORTABLE"),
                         ("queued", "STATE_RUN_ACTIVE"), ("paused", "STATE_RUN_ACTIVE"),
                         ("completed", "STATE_RUN_NOT_EXPORTABLE")]:  # fmt: skip
        with pytest.raises(BackpropError) as err:
            jobs.start(Run(id="r1", status=status), "gguf", "f16")
        assert err.value.code == code and "r1" in err.value.message
    assert not (run_dir / "exports").exists()  # nothing started

    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "config.json").write_text("{}")  # full fine-tuning saves a whole model
    assert weights_source(Run(id="r1", status="completed"), run_dir) == run_dir
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (run_dir / "adapter" / "config.json").unlink()
    assert weights_source(Run(id="r1", config={"output_dir": str(out)}), run_dir) == out


def test_the_base_model_source_leaves_the_adapter_out(tmp_path: Path) -> None:
    from backpropagate.errors import BackpropError
    from backpropagate.export.source import ExportSource, base_model_source

    run_dir = tmp_path / "r1"
    lora = ExportSource("/models/base", run_dir / "adapter", run_dir, {"model": "/models/base"})
    base = base_model_source(lora)
    assert (base.base_model, base.adapter_dir, base.name) == ("/models/base", None, "r1-base")
    assert base.default_output_root == run_dir / "exports"  # next to the run's own exports

    full = ExportSource(str(run_dir / "model"), None, run_dir, {"model": "/models/start"})
    assert base_model_source(full).base_model == "/models/start"  # where full fine-tuning began
    with pytest.raises(BackpropError) as err:
        base_model_source(ExportSource("/models/m", None, None, None))
    assert err.value.code == "CONFIG_INVALID_SETTING" and err.value.hint
