"""`backprop users` through the real CLI: a 0600 file of argon2 hashes that the policy accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from backpropagate.server.security.passwords import verify_password
from backpropagate.server.security.policy import resolve_policy


def backprop(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "backpropagate", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_security_users_add_list_remove(tmp_path: Path) -> None:
    home = tmp_path / "home"
    added = backprop(home, "users", "add", "alice", "--password-stdin", stdin="a long passphrase\n")
    assert added.returncode == 0, added.stderr
    users_file = home / "users.json"
    assert (users_file.stat().st_mode & 0o777) == 0o600
    stored = json.loads(users_file.read_text())["users"]["alice"]
    assert stored["hash"].startswith("$argon2") and "passphrase" not in users_file.read_text()
    assert verify_password("a long passphrase", stored["hash"])

    listed = backprop(home, "users", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == ["alice"] and "$argon2" not in listed.stdout

    policy = resolve_policy(
        host="127.0.0.1", port=7860, auth=None, auth_file=None, users_file=users_file, share=False, env={}
    )
    assert policy.mode == "basic" and policy.users["alice"] == stored["hash"]

    assert backprop(home, "users", "remove", "alice").returncode == 0
    assert json.loads(backprop(home, "users", "list", "--json").stdout) == []
    missing = backprop(home, "users", "remove", "alice")
    assert missing.returncode == 1 and "[STATE_NOT_FOUND]" in missing.stderr


def test_security_users_refuses_bad_input(tmp_path: Path) -> None:
    home = tmp_path / "home"
    short = backprop(home, "users", "add", "bob", "--password-stdin", stdin="short\n")
    assert short.returncode == 1 and "[INPUT_AUTH_INVALID_SHAPE]" in short.stderr
    bad_name = backprop(home, "users", "add", "bo:b", "--password-stdin", stdin="long enough pw\n")
    assert bad_name.returncode == 1 and "[INPUT_AUTH_INVALID_SHAPE]" in bad_name.stderr
    assert not (home / "users.json").exists()


def test_security_users_custom_file(tmp_path: Path) -> None:
    target = tmp_path / "team" / "accounts.json"
    r = backprop(
        tmp_path / "home",
        "users",
        "add",
        "carol",
        "--password-stdin",
        "--file",
        str(target),
        stdin="pw-pw-pw-pw\n",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(target.read_text())["users"].keys() == {"carol"}


def test_security_users_prompt_asks_twice(tmp_path: Path) -> None:
    # Without --password-stdin the password is prompted for, with confirmation; a mismatch asks again.
    env = {**os.environ, "BACKPROPAGATE_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "backpropagate", "users", "add", "erin"],
        input="first password\nother password\nfinal password\nfinal password\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # no controlling terminal: the prompt reads stdin
    )
    assert proc.returncode == 0, proc.stderr
    assert "do not match" in proc.stderr
    stored = json.loads((tmp_path / "home" / "users.json").read_text())["users"]["erin"]["hash"]
    assert verify_password("final password", stored) and not verify_password("first password", stored)
