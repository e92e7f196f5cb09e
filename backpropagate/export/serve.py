"""Serve a GGUF export over an OpenAI-style API (llama_cpp.server) and talk to it.

``stream_chat(base_url, messages)`` is the client the web app's Chat page and ``backprop chat``
use: it yields the reply piece by piece as the server streams it.
"""

from __future__ import annotations

import json
import socket
import sys
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


def serve_command(gguf: Path, port: int, host: str = "127.0.0.1", n_ctx: int = 2048) -> list[str]:
    """The llama_cpp.server command line for a GGUF, bound to loopback by default."""
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
    ]


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


def wait_ready(base_url: str, timeout_s: float = 60.0, proc: Any = None) -> None:
    """Poll /v1/models until the server answers (or the process dies, or time runs out)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BackpropError(
                ErrorCode.RUNTIME_INTERNAL,
                f"the model server exited with code {proc.returncode} before it was ready",
            )
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=2).status_code == 200:
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
    **params: Any,
) -> Iterator[str]:
    """Send a chat to an OpenAI-style server and yield the reply's text pieces as they arrive."""
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
        with httpx.stream("POST", url, json=body, timeout=httpx.Timeout(300, connect=5)) as resp:
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
