"""Ollama: a Modelfile for a GGUF export and a small client for Ollama's HTTP API.

The client uses the documented endpoints: ``HEAD/POST /api/blobs/sha256:<digest>`` (upload the
GGUF), ``POST /api/create`` (model, files, template, parameters), ``GET /api/tags`` and
``DELETE /api/delete``. Connection failures and 5xx answers are retried with exponential backoff.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode

DEFAULT_HOST = "http://127.0.0.1:11434"

_PROBE = [
    ("system", "\x01SYS\x01"),
    ("user", "\x01USR1\x01"),
    ("assistant", "\x01AST\x01"),
    ("user", "\x01USR2\x01"),
]


def _render_hf(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        bos_token="",
        eos_token="",
    )
    return rendered[0]


def translate_chat_template(chat_template: str | None) -> tuple[str, str] | None:
    """Derive a Go template (Ollama's TEMPLATE) from an HF chat template, with its end-of-turn text.

    The HF template is rendered on a probe conversation; when every message comes out as
    ``PREFIX(role) content SUFFIX`` with one PREFIX shape and one SUFFIX (ChatML, Llama 3 and
    their variants), the same shape is written as ``range .Messages``. Anything else returns None
    and Ollama falls back to the template stored in the GGUF.
    """
    if not chat_template:
        return None
    from backpropagate.export.gguf_convert import strip_generation_markers

    template = strip_generation_markers(chat_template)
    messages = [{"role": r, "content": c} for r, c in _PROBE]
    try:
        full = _render_hf(template, messages, True)
        plain = _render_hf(template, messages, False)
    except Exception:  # noqa: BLE001 - a template we cannot run is a template we cannot translate
        return None
    if not full.startswith(plain):
        return None
    positions, cursor = [], 0
    for _, content in _PROBE:
        at = plain.find(content, cursor)
        if at < 0:
            return None
        positions.append(at)
        cursor = at + len(content)
    prefix_system = plain[: positions[0]]
    if "system" not in prefix_system:
        return None
    shape = prefix_system.split("system")

    def prefix(role: str) -> str:
        return role.join(shape)

    suffix = plain[positions[-1] + len(_PROBE[-1][1]) :]
    for k in range(1, len(_PROBE)):
        between = plain[positions[k - 1] + len(_PROBE[k - 1][1]) : positions[k]]
        if between != suffix + prefix(_PROBE[k][0]):
            return None
    if full[len(plain) :] != prefix("assistant"):
        return None
    go = "{{- range .Messages }}" + "{{ .Role }}".join(shape) + "{{ .Content }}" + suffix + "{{ end }}"
    return go + prefix("assistant"), suffix.strip()


def modelfile_parts(
    chat_template: str | None, context_length: int | None = None, eos_token: str | None = None
) -> dict[str, Any]:
    """Template and parameters for a model with this chat template (shared by Modelfile and API)."""
    translated = translate_chat_template(chat_template)
    parameters: dict[str, Any] = {}
    if translated:
        stops = [t for t in (translated[1], eos_token) if t]
        if stops:
            parameters["stop"] = list(dict.fromkeys(stops))
    if context_length:
        parameters["num_ctx"] = min(int(context_length), 4096)
    return {"template": translated[0] if translated else None, "parameters": parameters}


def render_modelfile(
    gguf_name: str, chat_template: str | None, context_length: int | None = None, eos_token: str | None = None
) -> str:
    """Modelfile text: FROM the GGUF (relative to the Modelfile), TEMPLATE, stop tokens, PARAMETERs."""
    parts = modelfile_parts(chat_template, context_length, eos_token)
    lines = [f"FROM ./{gguf_name}"]
    if parts["template"]:
        lines.append(f'TEMPLATE """{parts["template"]}"""')
    else:
        lines.append("# chat template not recognised: Ollama uses the template stored in the GGUF")
    for key, value in parts["parameters"].items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f'PARAMETER {key} "{item}"' if isinstance(item, str) else f"PARAMETER {key} {item}")
    return "\n".join(lines) + "\n"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


class OllamaClient:
    """Talks to one Ollama daemon (``OLLAMA_HOST`` or 127.0.0.1:11434)."""

    def __init__(
        self, host: str | None = None, retries: int = 3, backoff_s: float = 0.5, timeout_s: float = 30
    ):
        host = host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
        self.base_url = host if "://" in host else f"http://{host}"
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            content = kwargs.get("content")
            if callable(content):  # a fresh upload stream per attempt
                kwargs = {**kwargs, "content": content()}
            try:
                resp = httpx.request(method, self.base_url + path, timeout=self.timeout_s, **kwargs)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            return resp
        raise BackpropError(
            ErrorCode.DEP_OLLAMA_REGISTRATION_FAILED,
            f"Ollama at {self.base_url} did not answer {method} {path} after {self.retries + 1} tries ({last})",
        )

    def _check(self, resp: Any, what: str) -> Any:
        if resp.status_code >= 400:
            raise BackpropError(
                ErrorCode.DEP_OLLAMA_REGISTRATION_FAILED,
                f"Ollama refused {what}: HTTP {resp.status_code} {resp.text[:300]}",
                retryable=False,
            )
        return resp

    def upload_blob(self, path: Path) -> str:
        """Upload a file as a blob unless the daemon has it already; returns its digest."""
        digest = file_digest(path)
        if self._request("HEAD", f"/api/blobs/{digest}").status_code == 200:
            return digest

        def stream() -> Iterator[bytes]:
            with open(path, "rb") as f:
                yield from iter(lambda: f.read(1 << 20), b"")

        # A known length (not chunked encoding): streams the file without holding it in memory.
        headers = {"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"}
        resp = self._request("POST", f"/api/blobs/{digest}", content=stream, headers=headers)
        self._check(resp, f"the upload of {path.name}")
        return digest

    def create(
        self,
        name: str,
        gguf_path: Path,
        chat_template: str | None,
        context_length: int | None = None,
        eos_token: str | None = None,
    ) -> dict:
        """Register ``name`` from a GGUF: upload the blob, then /api/create with template and parameters."""
        digest = self.upload_blob(gguf_path)
        parts = modelfile_parts(chat_template, context_length, eos_token)
        body: dict[str, Any] = {"model": name, "files": {gguf_path.name: digest}, "stream": False}
        if parts["template"]:
            body["template"] = parts["template"]
        if parts["parameters"]:
            body["parameters"] = parts["parameters"]
        resp = self._check(self._request("POST", "/api/create", json=body), f"creating {name}")
        return resp.json()

    def list(self) -> list[dict[str, Any]]:
        resp = self._check(self._request("GET", "/api/tags"), "listing models")
        return list(resp.json().get("models", []))

    def delete(self, name: str) -> None:
        resp = self._request("DELETE", "/api/delete", json={"model": name})
        if resp.status_code == 404:
            raise BackpropError(ErrorCode.STATE_NOT_FOUND, f"Ollama has no model named {name!r}")
        self._check(resp, f"deleting {name}")
