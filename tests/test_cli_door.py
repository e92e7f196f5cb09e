"""The `backprop` door: every error leaves with a catalog code (JSON with --json, a traceback only
with --verbose), --version, and every command's help carries an example and no ``<bool>``.

All through real `backprop` subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from backpropagate import __version__
from backpropagate.cli import app

BACKPROP = [sys.executable, "-m", "backpropagate"]

# A command that fails the way an unlucky machine does, run through the real entry point.
RAISER = """
import errno, sys
import typer
from backpropagate.cli import app, main

@app.command("boom")
def boom(kind: str, as_json: bool = typer.Option(False, "--json")) -> None:
    if kind == "disk":
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.bin")
    raise RuntimeError("something odd\\nsecond line")

sys.argv = ["backprop", *sys.argv[1:]]
main()
"""


def backprop(*args: str, home: Path, script: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home)}
    return subprocess.run(
        [*(script or BACKPROP), *args], env=env, capture_output=True, text=True, timeout=120
    )


def _commands() -> list[list[str]]:
    def walk(command, path):
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "backprop")
def test_every_command_help_has_an_example_and_no_bool_metavar(path: list[str], tmp_path: Path) -> None:
    result = backprop(*path, "--help", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
    assert "<bool>" not in result.stdout


def test_version(tmp_path: Path) -> None:
    result = backprop("--version", home=tmp_path)
    assert result.returncode == 0 and __version__ in result.stdout


def test_unreachable_url_has_its_own_code_as_json(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    result = backprop("runs", "list", "--url", url, "--json", home=tmp_path)
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "RUNTIME_SERVER_UNREACHABLE"
    assert url in error["message"] and "serve-api" in error["message"]
    assert error["hint"]


def test_watch_of_a_missing_run_fails_before_drawing_a_bar(tmp_path: Path) -> None:
    result = backprop("watch", "nosuch", home=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("[STATE_RUN_NOT_FOUND]")
    assert "None" not in result.stderr


def test_serve_api_on_a_busy_port_gives_the_port_code(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = backprop("serve-api", "--port", str(port), home=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("[CONFIG_INVALID_SETTING]") and f"port {port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_csv_error_maps_to_the_parse_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cell may be as large as an upload: one over a 1 MB upload limit is a csv.Error.
    monkeypatch.setenv("BACKPROPAGATE_SERVER__MAX_UPLOAD_MB", "1")
    data = tmp_path / "big.csv"
    data.write_text('text\n"' + "x" * 2_000_000 + '"\n')
    result = backprop("data", "validate", str(data), "--model", "none", home=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("[DATASET_PARSE_FAILED]") and "Traceback" not in result.stderr


def test_full_disk_maps_to_a_code_without_a_traceback(tmp_path: Path) -> None:
    result = backprop("boom", "disk", "--json", home=tmp_path, script=[sys.executable, "-c", RAISER])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] in ("RUNTIME_DISK_FULL", "RUNTIME_INTERNAL")
    assert "No space left" in error["message"] and "/data/out.bin" in error["message"]


def test_unexpected_error_gives_internal_code_and_a_traceback_file(tmp_path: Path) -> None:
    result = backprop("boom", "other", home=tmp_path, script=[sys.executable, "-c", RAISER])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    first, hint = result.stderr.splitlines()[:2]
    assert first == "[RUNTIME_INTERNAL] RuntimeError: something odd"
    logs = list((tmp_path / "logs").glob("cli-error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in hint
    assert "Traceback" in logs[0].read_text() and "second line" in logs[0].read_text()


def test_verbose_keeps_the_traceback(tmp_path: Path) -> None:
    result = backprop("--verbose", "boom", "other", home=tmp_path, script=[sys.executable, "-c", RAISER])
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "[RUNTIME_INTERNAL]" in result.stderr


def test_unknown_target_modules_give_a_settings_code(tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[1] / "examples" / "quickstart.jsonl"
    result = backprop(
        "train", "--model", "demo", "--data", str(data), "--steps", "2", "--target-modules", "nope_proj",
        home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "[CONFIG_INVALID_SETTING] --target-modules:" in result.stderr and "nope_proj" in result.stderr


def test_stopping_a_completed_run_says_it_is_not_active(tmp_path: Path) -> None:
    from backpropagate.events import Completed, EventLog, RunStarted

    run_id = "20260101-000001-done"
    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"data": "d.jsonl"}))
    with EventLog(run_dir / "events.jsonl", run_id) as log:
        log.append(RunStarted(pid=1, total_steps=1))
        log.append(Completed(step=1))
    assert backprop("runs", "reindex", home=tmp_path).returncode == 0
    result = backprop("runs", "stop", run_id, home=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("[STATE_RUN_NOT_ACTIVE]")
    assert "completed" in result.stderr


def test_users_add_hints_about_names_and_passwords_not_auth(tmp_path: Path) -> None:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(tmp_path)}
    for name, password in (("bad name", "long enough pw"), ("alice", "   ")):
        result = subprocess.run(
            [*BACKPROP, "users", "add", name, "--password-stdin", "--file", str(tmp_path / "u.json")],
            input=password + "\n", env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 1 and "[INPUT_AUTH_INVALID_SHAPE]" in result.stderr
        assert "--auth" not in result.stderr and "hint:" in result.stderr


def test_ui_help_describes_the_users_file_as_json(tmp_path: Path) -> None:
    text = " ".join(backprop("ui", "--help", home=tmp_path).stdout.split())
    assert "JSON" in text and "user:password a line" not in text
