"""Accounts: the users file (JSON of argon2 hashes, mode 0600) and the ``--auth-file`` format.

Users file: ``{"version": 1, "users": {"NAME": {"hash": "$argon2id$...", "created": "..."}}}``.
Auth file (``--auth-file``): one ``user:password`` per line in clear text, hashed at start;
blank lines and lines starting with ``#`` are ignored.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.settings import get_settings


def default_users_file() -> Path:
    return get_settings().home / "users.json"


def check_secret_file(path: Path, what: str) -> str | None:
    """Refuse a world-readable secret file; return a warning when it is group-readable."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BackpropError(
            ErrorCode.INPUT_AUTH_INVALID_SHAPE, f"The {what} {path} does not exist.", hint="Check the path."
        ) from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise BackpropError(
            ErrorCode.INPUT_AUTH_INVALID_SHAPE,
            f"The {what} {path} is readable or writable by every user on this machine "
            f"(mode {stat.filemode(mode)}).",
            hint=f"Restrict it: `chmod 600 {path}`.",
        )
    if mode & (stat.S_IRGRP | stat.S_IWGRP):
        return f"The {what} {path} is group-readable (mode {stat.filemode(mode)}); run `chmod 600 {path}`."
    return None


def validate_user_name(name: str, where: str) -> str:
    if not name or not name.strip() or name != name.strip() or ":" in name:
        raise BackpropError(
            ErrorCode.INPUT_AUTH_INVALID_SHAPE,
            f"{where}: the user name {name!r} is empty, has surrounding spaces or contains ':'.",
        )
    if any(ch.isspace() or ord(ch) < 32 for ch in name):
        raise BackpropError(
            ErrorCode.INPUT_AUTH_INVALID_SHAPE,
            f"{where}: the user name {name!r} contains spaces or control characters.",
        )
    return name


def validate_password(password: str, where: str) -> str:
    if not password or not password.strip():
        raise BackpropError(
            ErrorCode.INPUT_AUTH_INVALID_SHAPE, f"{where}: the password is empty or only spaces."
        )
    return password


def parse_auth_pair(value: str, where: str = "--auth") -> tuple[str, str]:
    """Split ``user:password`` (at the first colon) and check both halves."""
    if ":" not in value:
        raise BackpropError(
            ErrorCode.INPUT_AUTH_INVALID_SHAPE, f"{where}: expected user:password, found no ':'."
        )
    user, _, password = value.partition(":")
    return validate_user_name(user, where), validate_password(password, where)


def read_auth_file(path: Path) -> dict[str, str]:
    """Clear-text ``user:password`` lines -> {user: password}; every bad line is named."""
    pairs: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, password = parse_auth_pair(line.rstrip("\r\n"), f"{path}:{number}")
        pairs[user] = password
    if not pairs:
        raise BackpropError(ErrorCode.INPUT_AUTH_INVALID_SHAPE, f"{path} holds no user:password line.")
    return pairs


def load_users(path: Path) -> dict[str, str]:
    """{name: argon2 hash} from a users file; a missing file is an empty one."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        users = data["users"]
        return {name: entry["hash"] for name, entry in users.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackpropError(
            ErrorCode.INPUT_AUTH_INVALID_SHAPE,
            f"The users file {path} is not valid ({type(exc).__name__}: {exc}).",
            hint="Recreate it with `backprop users add NAME`.",
        ) from exc


def write_private_json(path: Path, data: object) -> None:
    """Write JSON atomically into a file only its owner can read (0600 from the first byte)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def save_user(path: Path, name: str, password_hash: str) -> None:
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"version": 1, "users": {}}
    data.setdefault("users", {})[name] = {
        "hash": password_hash,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_private_json(path, data)


def delete_user(path: Path, name: str) -> bool:
    if not path.exists():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    if name not in data.get("users", {}):
        return False
    del data["users"][name]
    write_private_json(path, data)
    return True


def list_users(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    load_users(path)  # validates the shape
    data = json.loads(path.read_text(encoding="utf-8"))
    return [{"name": n, "created": e.get("created", "")} for n, e in sorted(data["users"].items())]
