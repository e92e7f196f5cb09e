"""The security policy of one `backprop ui` launch: who may log in, from which hosts, how.

``resolve_policy`` turns the command line into a policy or refuses to start; the launcher hands
the policy to the server process through a 0600 launch file named by ``BACKPROPAGATE_UI_LAUNCH``.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.logs import get_logger
from backpropagate.server.security import accounts
from backpropagate.server.security.passwords import hash_password, require_guard_libraries
from backpropagate.settings import get_settings

log = get_logger(__name__)

AUTH_ENV = "BACKPROPAGATE_UI_AUTH"
LAUNCH_ENV = "BACKPROPAGATE_UI_LAUNCH"
ALLOWED_HOSTS_ENV = "BACKPROPAGATE_UI_ALLOWED_HOSTS"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


class SecurityPolicy(BaseModel):
    """Everything the guard needs; holds hashes and secrets, never a clear-text password."""

    mode: Literal["local", "basic", "shared", "network"] = Field(
        description="local: loopback + launch token; basic: loopback + accounts; "
        "shared: tunnel + accounts; network: non-loopback bind + accounts."
    )
    bind_host: str = Field("127.0.0.1", description="Interface the server binds to.")
    port: int = Field(7860, ge=1, le=65535, description="Port the server listens on.")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Host names answered besides loopback (any port)."
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="Extra origins (scheme://host[:port]) trusted for CSRF checks."
    )
    users: dict[str, str] = Field(default_factory=dict, repr=False, description="User name -> argon2 hash.")
    local_token_hash: str | None = Field(
        None, repr=False, description="SHA-256 hex of the launch token (local mode)."
    )
    session_secret: str = Field(repr=False, description="Key that signs session cookies.")
    secure_cookies: bool = Field(False, description="Mark cookies Secure even on plain-HTTP requests.")
    session_hours: float = Field(12.0, gt=0, description="How long a login session lasts.")
    same_user_peers: bool = Field(
        False,
        description="Local mode of `backprop serve-api`: a loopback client running as this OS user "
        "(the kernel's socket table says so) gets in without the token; no one else does.",
    )
    warnings: list[str] = Field(default_factory=list, exclude=True, description="Notes for the launcher.")


def is_loopback(host: str) -> bool:
    name = host.strip().lower().strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def hash_token(token: str) -> str:
    # The token is 256 random bits, so a fast hash is enough; only its digest is stored.
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh launch token for the printed URL."""
    return secrets.token_urlsafe(32)


def _hosts_for_bind(host: str) -> list[str]:
    """The names a browser may use to reach a non-loopback bind address."""
    if host in ("0.0.0.0", "::", ""):
        names = {socket.gethostname(), socket.getfqdn()}
        with contextlib.suppress(OSError):
            names |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        return sorted(n.lower() for n in names if n and not is_loopback(n))
    return [host.lower().strip("[]")]


def bind_host_names(host: str) -> list[str]:
    """The Host names a server bound to ``host`` answers besides loopback (none for a loopback bind)."""
    return [] if is_loopback(host) else _hosts_for_bind(host)


def strip_ambient_auth(env: MutableMapping[str, str], passed_on_cli: bool) -> list[str]:
    """Remove the auth variable so no child process inherits it.

    Returns the names that were removed *and ignored* (set in the environment but not passed on
    the command line), so the launcher can tell the user; never the values.
    """
    present = AUTH_ENV in env
    env.pop(AUTH_ENV, None)
    return [AUTH_ENV] if present and not passed_on_cli else []


def resolve_policy(
    *,
    host: str,
    port: int,
    auth: str | None,
    auth_file: Path | None,
    users_file: Path | None,
    share: bool,
    share_host: str | None = None,
    env: MutableMapping[str, str] = os.environ,
    extra_hosts: Iterable[str] = (),
) -> SecurityPolicy:
    """Build the launch's policy, or raise BackpropError when it would be unsafe to start."""
    if auth is not None and auth_file is not None:
        raise BackpropError(
            ErrorCode.INPUT_AUTH_INVALID_SHAPE, "--auth and --auth-file were both given; pass one of them."
        )
    warnings: list[str] = []
    clear: dict[str, str] = {}
    if auth is not None:
        user, password = accounts.parse_auth_pair(auth)
        clear[user] = password
    if auth_file is not None:
        note = accounts.check_secret_file(Path(auth_file), "auth file")
        if note:
            warnings.append(note)
        clear.update(accounts.read_auth_file(Path(auth_file)))
    users: dict[str, str] = {}
    if users_file is not None:
        users_file = Path(users_file)
        note = accounts.check_secret_file(users_file, "users file")
        if note:
            warnings.append(note)
        users = accounts.load_users(users_file)
        if not users:
            raise BackpropError(
                ErrorCode.INPUT_AUTH_INVALID_SHAPE,
                f"The users file {users_file} has no accounts.",
                hint="Add one with `backprop users add NAME`.",
            )

    exposed = share or not is_loopback(host)
    if exposed and not (clear or users):
        why = "--share" if share else f"--host {host} (not a loopback address)"
        raise BackpropError(
            ErrorCode.RUNTIME_UI_AUTH_NOT_ENFORCED,
            f"{why} would expose the app without authentication.",
        )
    # The guard protects every mode (local mode still needs signed cookies), so it must load.
    require_guard_libraries()
    users.update({name: hash_password(pw) for name, pw in clear.items()})
    clear.clear()

    mode: Literal["local", "basic", "shared", "network"]
    if not users:
        mode = "local"
    elif share:
        mode = "shared"
    elif not is_loopback(host):
        mode = "network"
    else:
        mode = "basic"

    allowed = [h.strip().lower() for h in env.get(ALLOWED_HOSTS_ENV, "").split(",") if h.strip()]
    allowed += [h.lower() for h in extra_hosts]
    origins: list[str] = []
    if not is_loopback(host):
        allowed += _hosts_for_bind(host)
    if share_host:
        name = share_host.split("://")[-1].split("/")[0].lower()
        allowed.append(name.split(":")[0])
        origins.append(f"https://{name}")
    for note in warnings:
        log.warning(note)
    return SecurityPolicy(
        mode=mode,
        bind_host=host,
        port=port,
        allowed_hosts=sorted(set(allowed)),
        allowed_origins=origins,
        users=users,
        session_secret=secrets.token_urlsafe(32),
        secure_cookies=share,
        session_hours=get_settings().server.session_hours,
        warnings=warnings,
    )


def launch_file_path() -> Path:
    return get_settings().home / "ui.lock"


def write_launch_file(policy: SecurityPolicy, token: str | None) -> Path:
    """Write the policy (with the token's hash) to a 0600 file for the server process."""
    if token is not None:
        policy = policy.model_copy(update={"local_token_hash": hash_token(token)})
    path = launch_file_path()
    data = {"pid": os.getpid(), "created": time.time(), "policy": policy.model_dump(mode="json")}
    accounts.write_private_json(path, data)
    return path


def _refuse(message: str) -> BackpropError:
    return BackpropError(
        ErrorCode.RUNTIME_UI_AUTH_NOT_ENFORCED, message, hint="Start the app with `backprop ui`."
    )


def load_launch_policy(env: MutableMapping[str, str] = os.environ) -> SecurityPolicy:
    """Read the launcher's policy; refuse when started without the launcher or the file is unsafe."""
    marker = env.get(LAUNCH_ENV)
    if not marker:
        raise _refuse(f"{LAUNCH_ENV} is not set: the UI server was not started by `backprop ui`.")
    path = Path(marker)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise _refuse(f"The launch file {path} does not exist.") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or info.st_uid != os.getuid():
        raise _refuse(f"The launch file {path} is readable by others or not owned by this user.")
    try:
        return SecurityPolicy.model_validate(json.loads(path.read_text(encoding="utf-8"))["policy"])
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise _refuse(f"The launch file {path} is not valid ({type(exc).__name__}).") from exc


def remove_launch_file(path: Path | None = None) -> None:
    (path or launch_file_path()).unlink(missing_ok=True)
