"""resolve_policy's refuse-to-start rules, the ambient auth variable, and the launch file hand-off."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.server.security import passwords
from backpropagate.server.security.policy import (
    AUTH_ENV,
    LAUNCH_ENV,
    hash_token,
    load_launch_policy,
    remove_launch_file,
    resolve_policy,
    strip_ambient_auth,
    write_launch_file,
)


def resolve(**kw):
    args = {
        "host": "127.0.0.1",
        "port": 7860,
        "auth": None,
        "auth_file": None,
        "users_file": None,
        "share": False,
        "env": {},
    }
    args.update(kw)
    return resolve_policy(**args)


def code_of(excinfo: pytest.ExceptionInfo[BackpropError]) -> ErrorCode:
    return excinfo.value.code


def test_security_policy_default_is_local_on_loopback() -> None:
    policy = resolve()
    assert policy.mode == "local" and policy.users == {} and policy.allowed_hosts == []
    assert len(policy.session_secret) >= 32 and not policy.secure_cookies


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "myhost.lan"])
def test_security_policy_refuses_exposed_host_without_auth(host: str) -> None:
    with pytest.raises(BackpropError) as exc:
        resolve(host=host)
    assert code_of(exc) == ErrorCode.RUNTIME_UI_AUTH_NOT_ENFORCED
    assert host in exc.value.message


def test_security_policy_refuses_share_without_auth() -> None:
    with pytest.raises(BackpropError) as exc:
        resolve(share=True, share_host="abc.trycloudflare.com")
    assert code_of(exc) == ErrorCode.RUNTIME_UI_AUTH_NOT_ENFORCED and "--share" in exc.value.message


@pytest.mark.parametrize(
    "value", ["alice", "alice:", ":secret", "   :secret", "alice:   ", "al ice:secret", " alice:secret", ""]
)
def test_security_policy_refuses_malformed_auth(value: str) -> None:
    with pytest.raises(BackpropError) as exc:
        resolve(auth=value)
    assert code_of(exc) == ErrorCode.INPUT_AUTH_INVALID_SHAPE


def test_security_policy_refuses_auth_and_auth_file_together(tmp_path: Path) -> None:
    f = tmp_path / "auth"
    f.write_text("bob:pw-of-bob\n")
    f.chmod(0o600)
    with pytest.raises(BackpropError) as exc:
        resolve(auth="alice:secret", auth_file=f)
    assert code_of(exc) == ErrorCode.INPUT_AUTH_INVALID_SHAPE


def test_security_policy_modes_and_hashing() -> None:
    basic = resolve(auth="alice:s3cret:with:colons")
    assert basic.mode == "basic" and list(basic.users) == ["alice"]
    assert basic.users["alice"].startswith("$argon2")
    assert passwords.verify_password("s3cret:with:colons", basic.users["alice"])
    assert "s3cret" not in basic.model_dump_json() and "s3cret" not in repr(basic)

    shared = resolve(auth="alice:secret", share=True, share_host="https://abc.trycloudflare.com")
    assert shared.mode == "shared" and shared.secure_cookies
    assert "abc.trycloudflare.com" in shared.allowed_hosts
    assert shared.allowed_origins == ["https://abc.trycloudflare.com"]

    network = resolve(
        auth="alice:secret", host="10.0.0.5", env={"BACKPROPAGATE_UI_ALLOWED_HOSTS": "gpu-box.lan"}
    )
    assert network.mode == "network" and {"10.0.0.5", "gpu-box.lan"} <= set(network.allowed_hosts)


def test_security_auth_file_parsed_and_permissions_checked(tmp_path: Path) -> None:
    f = tmp_path / "auth.txt"
    f.write_text("# team\nalice:pw-alice\n\nbob:pw:bob\n")
    f.chmod(0o600)
    policy = resolve(auth_file=f)
    assert set(policy.users) == {"alice", "bob"} and not policy.warnings
    assert passwords.verify_password("pw:bob", policy.users["bob"])

    f.chmod(0o640)
    assert "group-readable" in resolve(auth_file=f).warnings[0]

    f.chmod(0o644)
    with pytest.raises(BackpropError) as exc:
        resolve(auth_file=f)
    assert code_of(exc) == ErrorCode.INPUT_AUTH_INVALID_SHAPE and "chmod 600" in exc.value.hint


def test_security_auth_file_bad_line_is_named(tmp_path: Path) -> None:
    f = tmp_path / "auth.txt"
    f.write_text("alice:pw\nno-colon-here\n")
    f.chmod(0o600)
    with pytest.raises(BackpropError) as exc:
        resolve(auth_file=f)
    assert f"{f}:2" in exc.value.message


def test_security_users_file_used_and_empty_refused(tmp_path: Path) -> None:
    from backpropagate.server.security.accounts import save_user

    users = tmp_path / "users.json"
    save_user(users, "carol", passwords.hash_password("carols-password"))
    policy = resolve(users_file=users, host="0.0.0.0")
    assert policy.mode == "network" and set(policy.users) == {"carol"}
    users.write_text(json.dumps({"version": 1, "users": {}}))
    with pytest.raises(BackpropError):
        resolve(users_file=users)


def test_security_policy_refuses_when_guard_cannot_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import argon2` fail, as if the package were missing.
    monkeypatch.setitem(sys.modules, "argon2", None)
    passwords._context.cache_clear()
    try:
        with pytest.raises(BackpropError) as exc:
            resolve(auth="alice:secret")
        assert code_of(exc) == ErrorCode.RUNTIME_UI_AUTH_NOT_ENFORCED
        with pytest.raises(BackpropError):
            resolve()  # local mode needs the guard as much
    finally:
        passwords._context.cache_clear()


def test_security_strip_ambient_auth() -> None:
    env = {AUTH_ENV: "mallory:pw", "PATH": "/bin"}
    assert strip_ambient_auth(env, passed_on_cli=False) == [AUTH_ENV]
    assert AUTH_ENV not in env and env["PATH"] == "/bin"
    env = {AUTH_ENV: "alice:pw"}
    assert strip_ambient_auth(env, passed_on_cli=True) == []
    assert AUTH_ENV not in env  # never inherited by a child process either way
    assert strip_ambient_auth({}, passed_on_cli=False) == []


def test_security_launch_file_round_trip(isolated_home: Path) -> None:
    policy = resolve(auth="alice:launch-secret")
    path = write_launch_file(policy, "the-token")
    assert path.parent == isolated_home and (path.stat().st_mode & 0o777) == 0o600
    text = path.read_text()
    assert "launch-secret" not in text and "the-token" not in text
    loaded = load_launch_policy({LAUNCH_ENV: str(path)})
    assert loaded.users == policy.users and loaded.session_secret == policy.session_secret
    assert loaded.local_token_hash == hash_token("the-token")
    remove_launch_file()
    assert not path.exists()


def test_security_launch_file_refusals(isolated_home: Path) -> None:
    with pytest.raises(BackpropError) as exc:
        load_launch_policy({})
    assert code_of(exc) == ErrorCode.RUNTIME_UI_AUTH_NOT_ENFORCED and "backprop ui" in exc.value.hint
    with pytest.raises(BackpropError):
        load_launch_policy({LAUNCH_ENV: str(isolated_home / "missing.lock")})
    path = write_launch_file(resolve(), "tok")
    os.chmod(path, 0o644)
    with pytest.raises(BackpropError) as exc:
        load_launch_policy({LAUNCH_ENV: str(path)})
    assert "readable by others" in exc.value.message
    os.chmod(path, 0o600)
    path.write_text("{not json")
    with pytest.raises(BackpropError):
        load_launch_policy({LAUNCH_ENV: str(path)})
