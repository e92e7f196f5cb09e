"""The server process stays light at runtime, not only at import: after the web app's data check
and run start and an export request, torch and transformers are still not in it (each of those
runs in a subprocess: the data checker, the worker, the export job)."""

from __future__ import annotations

import json
import subprocess
import sys

from test_worker_standin import standin_env

HEAVY = ("torch", "transformers", "peft", "trl")

PROBE = """
import sys, time
from fastapi.testclient import TestClient
from backpropagate.server.app import create_app
from backpropagate.settings import Settings
from ui_app.state import service as ui

home = sys.argv[1]
app = create_app(Settings(home=home), gpu_indices=[])
with TestClient(app) as client:
    ui.use_service(app.state.service, app.state)  # the pages' handle, as ui_app.py hands it over
    data = home + "/datasets/d.jsonl"
    with open(data, "w") as fh:
        fh.write('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\\n')
    report = client.portal.call(ui.validate, data, "demo", 64)
    run_id = client.portal.call(ui.create_run, {"data": data, "steps": 2})
    deadline = time.time() + 120
    while client.get("/api/runs/" + run_id).json()["status"] != "completed" and time.time() < deadline:
        time.sleep(0.1)
    # The stand-in engine trains nothing: give the run an adapter folder for the export to take.
    adapter = app.state.service.run_dir(run_id) / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "demo"}')
    export = client.post("/api/runs/" + run_id + "/exports", json={"format": "adapter"})
    print(json.dumps({"rows": report.get("rows"), "export": export.status_code,
                      "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
"""


def test_server_process_imports_no_torch_after_check_start_and_export(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    probe = f"import json\nHEAVY = {HEAVY!r}\n{PROBE}"
    env = standin_env(BACKPROPAGATE_HOME=str(home), BACKPROPAGATE_STANDIN_STEP_S="0.01")
    out = subprocess.run(
        [sys.executable, "-c", probe, str(home)], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] == 1 and result["export"] == 202, out.stderr[-3000:]
    assert result["heavy"] == [], result
