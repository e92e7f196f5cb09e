"""Ollama: the Modelfile's TEMPLATE renders what the HF chat template renders, and the client
speaks Ollama's documented HTTP API (checked by a local server that records every request)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_export_support import CHATML, SAMPLE_CONVERSATION

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export.ollama import OllamaClient, render_modelfile, translate_chat_template

# ---------------------------------------------------------------- a Go template subset


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """Render the subset of Go's text/template the Modelfile uses: range .Messages, .Role,
    .Content, end, and the `{{-` / `-}}` whitespace trims."""
    parts = re.split(r"({{-?\s*.*?\s*-?}})", template)
    # Apply trims first, as Go does: `{{-` eats whitespace before, `-}}` after.
    for i, part in enumerate(parts):
        if part.startswith("{{-") and i > 0:
            parts[i - 1] = parts[i - 1].rstrip()
        if part.endswith("-}}") and i + 1 < len(parts):
            parts[i + 1] = parts[i + 1].lstrip()

    def run(pos: int, msg: dict[str, str] | None) -> tuple[str, int]:
        out = []
        while pos < len(parts):
            part = parts[pos]
            if not part.startswith("{{"):
                out.append(part)
                pos += 1
                continue
            action = part.strip("{}-").strip()
            if action == "end":
                return "".join(out), pos + 1
            if action == "range .Messages":
                end = pos + 1
                for m in messages:
                    text, end = run(pos + 1, m)
                    out.append(text)
                if not messages:
                    _, end = run(pos + 1, {"Role": "", "Content": ""})
                pos = end
                continue
            if action in (".Role", ".Content"):
                assert msg is not None, f"{action} outside range"
                out.append(msg[action[1:].lower()])
                pos += 1
                continue
            raise AssertionError(f"unsupported template action {action!r}")
        return "".join(out), pos

    return run(0, None)[0]


def hf_render(template: str, messages: list[dict[str, str]]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    # Render through transformers so the reference is exactly what training saw.
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=True
    )
    return rendered[0]


def test_modelfile_template_renders_like_the_hf_chat_template() -> None:
    modelfile = render_modelfile("run-q4_k_m.gguf", CHATML, context_length=8192, eos_token="<|endoftext|>")
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    assert render_go(template, SAMPLE_CONVERSATION) == hf_render(CHATML, SAMPLE_CONVERSATION)
    assert modelfile.startswith("FROM ./run-q4_k_m.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "PARAMETER num_ctx 4096" in modelfile


def test_llama3_template_translation_matches() -> None:
    llama3 = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    go, stop = translate_chat_template(llama3)
    # BOS is the runtime's job (add_bos in the GGUF), so the reference renders without it.
    expected = hf_render(llama3.replace("{{ bos_token }}", ""), SAMPLE_CONVERSATION)
    assert render_go(go, SAMPLE_CONVERSATION) == expected
    assert stop == "<|eot_id|>"


def test_newline_separated_chatml_translates_too() -> None:
    # The common ChatML spelling puts a newline after each turn (CHATML above has none: trim_blocks).
    chatml_nl = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    go, stop = translate_chat_template(chat_ml_nl := chatml_nl)
    assert render_go(go, SAMPLE_CONVERSATION) == hf_render(chat_ml_nl, SAMPLE_CONVERSATION)
    assert "<|im_end|>\n<|im_start|>user" in render_go(go, SAMPLE_CONVERSATION)
    assert stop == "<|im_end|>"


def test_unknown_template_leaves_the_gguf_template_in_charge() -> None:
    modelfile = render_modelfile("m.gguf", "{{ messages[0]['content'] }}")
    assert "TEMPLATE" not in modelfile and "PARAMETER stop" not in modelfile


# ---------------------------------------------------------------- the API contract


class FakeOllama:
    """A local HTTP server that records requests and answers the way Ollama's API documents."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.blobs: dict[str, bytes] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: Any = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body() if self.command in ("POST", "DELETE") else b""
                outer.requests.append({"method": self.command, "path": self.path, "body": body})
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    return self._answer(503, {"error": "starting"})
                blob = re.fullmatch(r"/api/blobs/(sha256:[0-9a-f]{64})", self.path)
                if blob and self.command == "HEAD":
                    return self._answer(200 if blob.group(1) in outer.blobs else 404)
                if blob and self.command == "POST":
                    if "sha256:" + hashlib.sha256(body).hexdigest() != blob.group(1):
                        return self._answer(400, {"error": "digest mismatch"})
                    outer.blobs[blob.group(1)] = body
                    return self._answer(201)
                if self.path == "/api/create" and self.command == "POST":
                    req = json.loads(body)
                    missing = [d for d in req.get("files", {}).values() if d not in outer.blobs]
                    if not req.get("model") or missing:
                        return self._answer(400, {"error": f"missing blob {missing}"})
                    outer.models[req["model"]] = req
                    return self._answer(200, {"status": "success"})
                if self.path == "/api/tags" and self.command == "GET":
                    return self._answer(
                        200, {"models": [{"name": f"{n}:latest", "size": 1} for n in outer.models]}
                    )
                if self.path == "/api/delete" and self.command == "DELETE":
                    name = json.loads(body)["model"]
                    if outer.models.pop(name, None) is None:
                        return self._answer(404, {"error": "not found"})
                    return self._answer(200)
                return self._answer(404, {"error": "no such endpoint"})

            do_GET = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ollama() -> FakeOllama:
    server = FakeOllama()
    yield server
    server.close()


def test_register_list_delete_follow_the_documented_api(ollama: FakeOllama, tmp_path: Path) -> None:
    gguf = tmp_path / "run-q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    digest = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    client = OllamaClient(ollama.url, backoff_s=0.01)

    client.create("mymodel", gguf, CHATML, context_length=2048, eos_token="<|endoftext|>")
    methods = [(r["method"], r["path"]) for r in ollama.requests]
    assert methods == [
        ("HEAD", f"/api/blobs/{digest}"),
        ("POST", f"/api/blobs/{digest}"),
        ("POST", "/api/create"),
    ]
    assert ollama.blobs[digest] == gguf.read_bytes()
    create = json.loads(ollama.requests[-1]["body"])
    assert create["model"] == "mymodel"
    assert create["files"] == {"run-q8_0.gguf": digest}
    assert create["stream"] is False
    assert create["template"] == translate_chat_template(CHATML)[0]
    assert create["template"].startswith("{{- range .Messages }}<|im_start|>{{ .Role }}")
    assert create["parameters"] == {"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 2048}

    # A second registration finds the blob already there and does not upload it again.
    client.create("again", gguf, CHATML)
    assert [r["method"] for r in ollama.requests[3:]] == ["HEAD", "POST"]
    assert ollama.requests[-1]["path"] == "/api/create"

    assert {m["name"] for m in client.list()} == {"mymodel:latest", "again:latest"}
    client.delete("mymodel")
    assert json.loads(ollama.requests[-1]["body"]) == {"model": "mymodel"}
    with pytest.raises(BackpropError) as err:
        client.delete("mymodel")
    assert err.value.code == ErrorCode.STATE_NOT_FOUND


def test_server_errors_are_retried_with_backoff(tmp_path: Path) -> None:
    server = FakeOllama(fail_first=2)
    try:
        assert OllamaClient(server.url, retries=3, backoff_s=0.01).list() == []
        assert len(server.requests) == 3  # two 503s, then the answer
    finally:
        server.close()


def test_unreachable_daemon_is_a_retryable_registration_error(tmp_path: Path) -> None:
    from backpropagate.export.serve import free_port

    client = OllamaClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01, timeout_s=1)
    with pytest.raises(BackpropError) as err:
        client.list()
    assert err.value.code == ErrorCode.DEP_OLLAMA_REGISTRATION_FAILED
    assert err.value.retryable
    assert "ollama serve" in err.value.hint
    assert "3 tries" in err.value.message


def test_ollama_host_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:5555")
    assert OllamaClient().base_url == "http://127.0.0.1:5555"


def test_cli_register_list_rm_through_ollama_host(ollama: FakeOllama, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    export = tmp_path / "gguf-q8_0"
    export.mkdir()
    (export / "run-q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 4096)
    meta = {
        "gguf": "run-q8_0.gguf",
        "chat_template": CHATML,
        "context_length": 1024,
        "eos_token": "<|im_end|>",
    }
    (export / "export.json").write_text(json.dumps(meta))
    env = {**os.environ, "OLLAMA_HOST": ollama.url}
    cli = [sys.executable, "-c", "from backpropagate.cli import main; main()", "ollama"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=120)

    reg = run("register", str(export), "--name", "tiny")
    assert reg.returncode == 0, reg.stderr
    assert ollama.models["tiny"]["parameters"] == {"stop": ["<|im_end|>"], "num_ctx": 1024}
    assert "tiny:latest" in run("list").stdout
    assert run("rm", "tiny").returncode == 0 and "tiny" not in ollama.models
    gone = run("rm", "tiny")
    assert gone.returncode == 1 and "[STATE_NOT_FOUND]" in gone.stderr
