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

# Chat templates translated to Go template syntax (what Ollama's TEMPLATE uses), by family.
# System prompts arrive as messages with role "system" when a template ranges over .Messages.
GO_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}
STOP_TOKENS = {"chatml": ["<|im_end|>", "<|endoftext|>"], "llama3": ["<|eot_id|>", "<|end_of_text|>"]}


def template_family(chat_template: str | None) -> str | None:
    """Which known chat format an HF (Jinja) chat template writes, or None."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    return None


def modelfile_parts(chat_template: str | None, context_length: int | None = None) -> dict[str, Any]:
    """Template and parameters for a model with this chat template (shared by Modelfile and API)."""
    family = template_family(chat_template)
    parameters: dict[str, Any] = {}
    if family:
        parameters["stop"] = STOP_TOKENS[family]
    if context_length:
        parameters["num_ctx"] = min(int(context_length), 4096)
    return {"template": GO_TEMPLATES.get(family or ""), "parameters": parameters, "family": family}


def render_modelfile(gguf_name: str, chat_template: str | None, context_length: int | None = None) -> str:
    """Modelfile text: FROM the GGUF (relative to the Modelfile), TEMPLATE, stop tokens, PARAMETERs."""
    parts = modelfile_parts(chat_template, context_length)
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

        self._check(
            self._request("POST", f"/api/blobs/{digest}", content=stream), f"the upload of {path.name}"
        )
        return digest

    def create(
        self, name: str, gguf_path: Path, chat_template: str | None, context_length: int | None = None
    ) -> dict:
        """Register ``name`` from a GGUF: upload the blob, then /api/create with template and parameters."""
        digest = self.upload_blob(gguf_path)
        parts = modelfile_parts(chat_template, context_length)
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
