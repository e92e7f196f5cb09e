"""The model server behind Export → serve, Chat and `backprop serve`: llama_cpp.server, locked down.

``python -m backpropagate.export.model_server --model F.gguf --port P [--host H] [--n_ctx N]
[--api-key-file K] [--exit-with-parent]``

llama_cpp.server alone answers anyone who can reach its port, sends
``Access-Control-Allow-Origin: *`` with credentials and ignores the Host header. Here it runs
with an API key (read from a 0600 file, which is deleted once read, so the key never appears in
``ps`` or on disk for long), without its CORS middleware, behind our Host allowlist (DNS
rebinding) and the Origin check (no cross-site POSTs or sockets).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any


def read_key_file(path: Path) -> str:
    """The key in ``path``, which is removed at once: the server holds it in memory only."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    if not key:
        raise SystemExit(f"model server: the key file {path} is empty")
    return key


def build_app(model: Path, host: str, port: int, n_ctx: int, api_key: str | None) -> Any:
    """llama_cpp.server's app with the key, without CORS, behind the Host and Origin checks."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from starlette.middleware.cors import CORSMiddleware

    from backpropagate.server.security.hosts import HostAllowlist
    from backpropagate.server.security.origin import OriginCheck
    from backpropagate.server.security.policy import bind_host_names

    os.environ.pop("CONFIG_FILE", None)  # llama_cpp would read its whole configuration from it
    server = ServerSettings(host=host, port=port, api_key=api_key)
    app = create_app(server_settings=server, model_settings=[ModelSettings(model=str(model), n_ctx=n_ctx)])
    # Its CORS middleware lets every site read the answers (allow_origins=["*"] with credentials).
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    # Clients of this server (our own process, curl, OpenAI SDKs) send no Origin; browsers always
    # do on POSTs, so a page on another site is refused.
    return HostAllowlist(OriginCheck(app, [], allow_missing=True), bind_host_names(host))


def _exit_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies (even by SIGKILL), so no server is left listening."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent was gone before the call above
        sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="backpropagate.export.model_server")
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--n_ctx", type=int, default=2048)
    parser.add_argument("--api-key-file", type=Path, default=None)
    parser.add_argument("--exit-with-parent", action="store_true")
    args = parser.parse_args(argv)
    if args.exit_with_parent:
        _exit_with_parent()
    api_key = read_key_file(args.api_key_file) if args.api_key_file else None
    import uvicorn

    app = build_app(args.model, args.host, args.port, args.n_ctx, api_key)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=False)


if __name__ == "__main__":
    main()
