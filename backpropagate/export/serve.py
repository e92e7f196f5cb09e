"""Serve a GGUF export over an OpenAI-style API (llama_cpp.server) and talk to it.

``stream_chat(base_url, messages)`` is the client the web app's Chat page and ``backprop chat``
use: it yields the reply piece by piece as the server streams it.

Every model server started through ``serve_command`` has an API key unless asked otherwise: a
fresh random one per server, remembered in this process by base URL, so ``wait_ready`` and
``stream_chat`` send it to the servers this process started (and to no other URL).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.settings import get_settings


def is_base_export(gguf: Path) -> bool:
    """Whether ``gguf`` is a run's untrained base model (``--base-model``), not its trained export."""
    result = gguf.parent / "result.json"
    if result.is_file():
        try:
            return bool(json.loads(result.read_text()).get("base_model"))
        except (OSError, ValueError):
            pass
    return gguf.parent.name.endswith("-base") or "-base-" in gguf.parent.name


def resolve_gguf(export: str | Path) -> Path:
    """A .gguf file, an export folder holding one, or a run id / run folder (its newest trained GGUF).

    A run's base-model exports are there to compare with; they are served only when named directly.
    """
    path = Path(export).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []  # an export folder, named directly
    run_folders = [f for f in (get_settings().runs_dir / str(export), path) if (f / "exports").is_dir()]
    trained = [
        p for f in run_folders for p in (f / "exports").rglob("*.gguf")
        if ".work" not in p.parts and not is_base_export(p)
    ]  # fmt: skip
    found = found or trained
    if not found:
        raise BackpropError(
            ErrorCode.STATE_NOT_FOUND,
            f"no trained .gguf export at {export!r}: export one first "
            "(`backprop export RUN_ID --format gguf`); a base-model export is served by its file path",
        )
    return max(found, key=lambda p: p.stat().st_mtime).resolve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_KEYS: dict[str, str] = {}  # base URL -> API key of a model server this process started
_KEYS_LOCK = threading.Lock()


def _base_urls(host: str, port: int) -> list[str]:
    shown = f"[{host}]" if ":" in host else host
    names = {shown, "127.0.0.1"} if host in ("0.0.0.0", "localhost", "127.0.0.1") else {shown}
    return [f"http://{name}:{port}" for name in sorted(names)]


def server_key(base_url: str) -> str | None:
    """The API key of the model server at ``base_url`` if this process started it."""
    with _KEYS_LOCK:
        return _KEYS.get(base_url.rstrip("/"))


def _write_key_file(key: str, port: int) -> Path:
    """A 0600 file under the private home holding ``key``; the server deletes it once read."""
    folder = get_settings().home / "keys"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"model-server-{port}-{secrets.token_hex(4)}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(key)
    return path


def serve_command(
    gguf: Path,
    port: int,
    host: str = "127.0.0.1",
    n_ctx: int = 2048,
    *,
    api_key: str | None = None,
    open_access: bool = False,
    exit_with_parent: bool = False,
) -> list[str]:
    """The model server's command line for a GGUF, bound to loopback by default.

    The server gets ``api_key``, or a fresh random key (remembered for ``stream_chat``), unless
    ``open_access``. ``exit_with_parent``: the server stops when this process dies.
    """
    args = [
        sys.executable,
        "-m",
        "backpropagate.export.model_server",
        "--model",
        str(gguf),
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
    ]
    if not open_access:
        key = api_key or secrets.token_urlsafe(32)
        # The path is on the command line (ps shows it), the key is not.
        args += ["--api-key-file", str(_write_key_file(key, port))]
        with _KEYS_LOCK:
            _KEYS.update(dict.fromkeys(_base_urls(host, port), key))
    if exit_with_parent:
        args.append("--exit-with-parent")
    return args


def _auth_headers(base_url: str, api_key: str | None) -> dict[str, str]:
    key = api_key or server_key(base_url)
    return {"Authorization": f"Bearer {key}"} if key else {}


def check_server_extra() -> None:
    import importlib.util

    missing = [
        m
        for m in ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context")
        if not importlib.util.find_spec(m)
    ]
    if missing:
        raise BackpropError(
            ErrorCode.DEP_LLAMA_CPP_MISSING,
            f"serving needs llama-cpp-python[server]; missing: {', '.join(missing)}",
            hint="pip install 'llama-cpp-python[server]' (needs build-essential and cmake)",
        )


def wait_ready(base_url: str, timeout_s: float = 60.0, proc: Any = None, api_key: str | None = None) -> None:
    """Poll /v1/models until the server answers (or the process dies, or time runs out)."""
    import httpx

    headers = _auth_headers(base_url, api_key)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BackpropError(
                ErrorCode.RUNTIME_INTERNAL,
                f"the model server exited with code {proc.returncode} before it was ready",
            )
        try:
            if httpx.get(f"{base_url}/v1/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise BackpropError(
        ErrorCode.RUNTIME_INTERNAL, f"the model server at {base_url} did not answer in {timeout_s:.0f} s"
    )


def stream_chat(
    base_url: str,
    messages: list[dict[str, str]],
    *,
    max_tokens: int = 256,
    temperature: float = 0.7,
    api_key: str | None = None,
    **params: Any,
) -> Iterator[str]:
    """Send a chat to an OpenAI-style server and yield the reply's text pieces as they arrive.

    ``api_key`` defaults to the key of the server, when this process started it.
    """
    import httpx

    body = {
        "messages": messages,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": temperature,
        **params,
    }
    url = base_url.rstrip("/") + "/v1/chat/completions"
    try:
        headers = _auth_headers(base_url, api_key)
        with httpx.stream(
            "POST", url, json=body, headers=headers, timeout=httpx.Timeout(300, connect=5)
        ) as resp:
            if resp.status_code == 401:
                raise BackpropError(
                    ErrorCode.AUTH_INVALID_CREDENTIALS,
                    f"the model server at {base_url} wants an API key, and this one was missing or wrong",
                    hint="pass the key the server was started with: "
                    "`backprop chat --url URL --api-key-file FILE`",
                )
            if resp.status_code != 200:
                resp.read()
                raise BackpropError(
                    ErrorCode.RUNTIME_INTERNAL,
                    f"chat request to {url} failed: HTTP {resp.status_code} {resp.text[:300]}",
                )
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                for choice in json.loads(data).get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece
    except httpx.TransportError as exc:
        raise BackpropError(
            ErrorCode.RUNTIME_INTERNAL,
            f"cannot reach the model server at {base_url}: {exc}",
            hint="start it with `backprop serve EXPORT` and pass its URL",
            retryable=True,
        ) from exc
