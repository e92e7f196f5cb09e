"""`backprop ui` and the app module refuse unsafe starts, through the real CLI and real Reflex."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def run_ui(
    tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(tmp_path / "home"), **(env_extra or {})}
    env.pop("BACKPROPAGATE_UI_LAUNCH", None)
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", "ui", "--no-browser", "--port", "7999", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_refused(proc: subprocess.CompletedProcess, code: str, home: Path) -> None:
    assert proc.returncode == 1, proc.stderr
    assert f"[{code}]" in proc.stderr
    assert "hint:" in proc.stderr
    # Nothing was prepared: no launch file, no build folder.
    assert not (home / "ui.lock").exists()
    assert not (home / "ui").exists()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--share"], "RUNTIME_UI_AUTH_NOT_ENFORCED"),
        (["--host", "0.0.0.0"], "RUNTIME_UI_AUTH_NOT_ENFORCED"),
        (["--auth", "nocolon"], "INPUT_AUTH_INVALID_SHAPE"),
    ],
)
def test_launcher_refuses_unsafe_flags(tmp_path: Path, args: list[str], code: str) -> None:
    assert_refused(run_ui(tmp_path, *args), code, tmp_path / "home")


def test_launcher_refuses_auth_and_auth_file_together(tmp_path: Path) -> None:
    secret = tmp_path / "auth"
    secret.write_text("bob:a-long-password\n")
    secret.chmod(0o600)
    proc = run_ui(tmp_path, "--auth", "alice:pw", "--auth-file", str(secret))
    assert_refused(proc, "INPUT_AUTH_INVALID_SHAPE", tmp_path / "home")


def test_launcher_refuses_world_readable_auth_file(tmp_path: Path) -> None:
    secret = tmp_path / "auth"
    secret.write_text("bob:a-long-password\n")
    secret.chmod(0o644)
    proc = run_ui(tmp_path, "--auth-file", str(secret))
    assert_refused(proc, "INPUT_AUTH_INVALID_SHAPE", tmp_path / "home")
    assert "chmod 600" in proc.stderr


def test_launcher_ignores_ambient_auth_and_says_so(tmp_path: Path) -> None:
    # An auth variable left in the shell must not silently become the password: it is dropped,
    # the user is told, and --share without --auth is then refused.
    proc = run_ui(tmp_path, "--share", env_extra={"BACKPROPAGATE_UI_AUTH": "eve:from-the-env"})
    assert "ignoring BACKPROPAGATE_UI_AUTH" in proc.stderr
    assert "from-the-env" not in proc.stderr
    assert_refused(proc, "RUNTIME_UI_AUTH_NOT_ENFORCED", tmp_path / "home")


def test_launcher_share_without_cloudflared_suggests_ssh(tmp_path: Path) -> None:
    # A PATH with python's own folder but no cloudflared.
    proc = run_ui(tmp_path, "--share", "--auth", "alice:a-long-password", env_extra={"PATH": str(VENV_BIN)})
    assert proc.returncode == 1, proc.stderr
    assert "[DEP_TUNNEL_FAILED]" in proc.stderr
    assert "ssh -L 7999:localhost:7999" in proc.stderr
    assert not (tmp_path / "home" / "ui.lock").exists()


def test_launcher_app_module_refuses_without_marker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BACKPROPAGATE_UI_LAUNCH"}
    proc = subprocess.run(
        [sys.executable, "-c", "import ui_app.ui_app"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "RUNTIME_UI_AUTH_NOT_ENFORCED" in proc.stderr


def test_launcher_reflex_run_refuses_without_launcher(tmp_path: Path) -> None:
    # `reflex run` straight from a checkout-like folder (the root rxconfig.py) must not serve.
    shutil.copy(REPO / "rxconfig.py", tmp_path / "rxconfig.py")
    env = {k: v for k, v in os.environ.items() if k != "BACKPROPAGATE_UI_LAUNCH"}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        REFLEX_DIR=str(tmp_path / "reflex-dir"),
        BACKPROPAGATE_UI_PORT="7998",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "reflex", "run", "--env", "prod"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "RUNTIME_UI_AUTH_NOT_ENFORCED" in proc.stdout + proc.stderr
    assert not (tmp_path / ".web" / "build").exists()
