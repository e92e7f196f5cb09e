"""`backprop ui` refuses to start when the app would be reachable without authentication."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def backprop_ui(
    tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(tmp_path / "home"), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", "ui", "--no-browser", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module", autouse=True)
def ui_command_exists() -> None:
    probe = subprocess.run(
        [sys.executable, "-m", "backpropagate", "ui", "--help"], capture_output=True, text=True, timeout=120
    )
    if probe.returncode != 0:
        pytest.skip("`backprop ui` is not part of this build")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--share"], "RUNTIME_UI_AUTH_NOT_ENFORCED"),
        (["--host", "0.0.0.0"], "RUNTIME_UI_AUTH_NOT_ENFORCED"),
        (["--host", "192.168.1.20", "--port", "7999"], "RUNTIME_UI_AUTH_NOT_ENFORCED"),
        (["--auth", "alice"], "INPUT_AUTH_INVALID_SHAPE"),
        (["--auth", "alice:"], "INPUT_AUTH_INVALID_SHAPE"),
        (["--auth", ":secret"], "INPUT_AUTH_INVALID_SHAPE"),
        (["--auth", "   :   "], "INPUT_AUTH_INVALID_SHAPE"),
    ],
)
def test_security_cli_refuses_to_start(tmp_path: Path, args: list[str], code: str) -> None:
    proc = backprop_ui(tmp_path, *args)
    assert proc.returncode == 1, proc.stderr
    assert f"[{code}]" in proc.stderr
    assert "hint:" in proc.stderr
    assert not (tmp_path / "home" / "ui.lock").exists()


def test_security_cli_refuses_auth_with_auth_file(tmp_path: Path) -> None:
    f = tmp_path / "auth"
    f.write_text("bob:bobs-password\n")
    f.chmod(0o600)
    proc = backprop_ui(tmp_path, "--auth", "alice:pw", "--auth-file", str(f))
    assert proc.returncode == 1 and "[INPUT_AUTH_INVALID_SHAPE]" in proc.stderr


def test_security_cli_refuses_world_readable_auth_file(tmp_path: Path) -> None:
    f = tmp_path / "auth"
    f.write_text("bob:bobs-password\n")
    f.chmod(0o644)
    proc = backprop_ui(tmp_path, "--host", "0.0.0.0", "--auth-file", str(f))
    assert proc.returncode == 1 and "[INPUT_AUTH_INVALID_SHAPE]" in proc.stderr
    assert "chmod 600" in proc.stderr
    assert "bobs-password" not in proc.stderr + proc.stdout


def test_security_cli_ignores_ambient_auth(tmp_path: Path) -> None:
    # Credentials left in the environment do not count: exposing the app needs them on the command line.
    proc = backprop_ui(tmp_path, "--host", "0.0.0.0", env_extra={"BACKPROPAGATE_UI_AUTH": "alice:ambient-pw"})
    assert proc.returncode == 1 and "[RUNTIME_UI_AUTH_NOT_ENFORCED]" in proc.stderr
    assert "BACKPROPAGATE_UI_AUTH" in proc.stderr and "ambient-pw" not in proc.stderr
