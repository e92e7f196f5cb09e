"""`backprop serve-api`: the REST API alone, behind the same guard and modes as `backprop ui`.

Local mode (the default) binds loopback. It prints a per-launch token for browsers and other
clients, and lets in without it only a loopback client that runs as this OS user (the kernel's
socket table names the owner of the client's socket): the CLI's ``--url`` and scripts keep
working, another local user gets 401. ``--auth`` / ``--auth-file`` / ``--users`` give basic mode,
and with them a non-loopback ``--host`` (network mode); without them that host is refused.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from backpropagate.server.security import policy as security
from backpropagate.settings import get_settings

# Scripts poll the API; the UI's per-address request limit is sized for one browser tab.
API_REQUESTS_BURST = 2000
API_REQUESTS_PER_SECOND = 200


DEFAULT_PORT = 8000  # not the settings' 7860: that one is `backprop ui`'s


@dataclass
class ApiOptions:
    """The flags of `backprop serve-api`; a host or port left None comes from Settings."""

    host: str | None = None
    port: int | None = None
    log_level: str = "info"
    auth: str | None = None
    auth_file: Path | None = None
    users_file: Path | None = None

    @property
    def bind_host(self) -> str:
        return get_settings().server.host if self.host is None else self.host  # flags win

    @property
    def bind_port(self) -> int:
        if self.port is not None:
            return self.port
        server = get_settings().server
        return server.port if "port" in server.model_fields_set else DEFAULT_PORT


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def api_policy(opts: ApiOptions) -> tuple[security.SecurityPolicy, str | None]:
    """The server's policy and, in local mode, its token; refuses unsafe flags like `backprop ui`."""
    for name in security.strip_ambient_auth(os.environ, passed_on_cli=bool(opts.auth or opts.auth_file)):
        _say(f"note: ignoring {name} from the environment; pass credentials with --auth or --auth-file")
    policy = security.resolve_policy(
        host=opts.bind_host,
        port=opts.bind_port,
        auth=opts.auth,
        auth_file=opts.auth_file,
        users_file=opts.users_file,
        share=False,
    )
    for note in policy.warnings:
        _say(f"warning: {note}")
    if policy.mode != "local":
        return policy, None
    token = security.new_token()
    update = {"local_token_hash": security.hash_token(token), "same_user_peers": True}
    return policy.model_copy(update=update), token


def serve_api(opts: ApiOptions) -> None:
    """Run the API server until interrupted."""
    from backpropagate.launcher.run import check_port_free

    policy, token = api_policy(opts)
    check_port_free(opts.bind_host, opts.bind_port, server="server")
    os.umask(0o077)  # the DB, logs and uploads are readable by this user only
    import uvicorn

    from backpropagate.server.app import create_app
    from backpropagate.server.security import build_guard

    app = build_guard(
        create_app(),
        policy,
        requests_burst=API_REQUESTS_BURST,
        requests_per_second=API_REQUESTS_PER_SECOND,
    )
    shown = f"[{opts.bind_host}]" if ":" in opts.bind_host else opts.bind_host
    _say(f"API at http://{shown}:{opts.bind_port}/api ({policy.mode} mode)")
    if token:
        _say(
            "this user's own processes on this machine need no token; other clients send "
            f"`Authorization: Bearer {token}`"
        )
    # proxy_headers off: uvicorn would otherwise take X-Forwarded-For from any loopback peer; the
    # guard believes it only from BACKPROPAGATE_SERVER__TRUSTED_PROXIES.
    uvicorn.run(
        app,
        host=opts.bind_host,
        port=opts.bind_port,
        log_level=opts.log_level,
        ws="websockets-sansio",
        proxy_headers=False,
    )
