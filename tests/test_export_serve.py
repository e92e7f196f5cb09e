"""`backprop serve` answers chat completions from a GGUF export (real subprocess, free port),
and `stream_chat` / `backprop chat --url` stream the reply."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_export_support import qwen2_run  # noqa: F401 - fixture

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export import export_run, stream_chat
from backpropagate.export.serve import free_port, resolve_gguf, wait_ready

pytest.importorskip("llama_cpp.server")
BACKPROP = [sys.executable, "-c", "from backpropagate.cli import main; main()"]


def test_serve_answers_a_streamed_chat_completion(qwen2_run: Path) -> None:  # noqa: F811
    result = export_run(qwen2_run, "gguf", "q8_0", verify=False)
    assert resolve_gguf(qwen2_run.name) == Path(result.path).resolve()  # a run id finds its newest GGUF
    port = free_port()
    proc = subprocess.Popen(
        [*BACKPROP, "serve", qwen2_run.name, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout_s=120, proc=proc)
        messages = [{"role": "user", "content": "What is fine-tuning?"}]
        pieces = list(stream_chat(base, messages, max_tokens=16, temperature=0.0))
        assert len(pieces) >= 2  # streamed, not one block
        assert "".join(pieces).strip()

        chat = subprocess.run(
            [*BACKPROP, "chat", "--url", base, "--max-tokens", "8"],
            input="Hello there\n\n",
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.startswith("> ") and len(chat.stdout.strip()) > 2
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_chat_loads_the_gguf_and_streams_replies(qwen2_run: Path) -> None:  # noqa: F811
    export_run(qwen2_run, "gguf", "q8_0", verify=False)
    chat = subprocess.run(
        [*BACKPROP, "chat", qwen2_run.name, "--max-tokens", "8", "--system", "Be brief."],
        input="Hello there\nAnd again\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert chat.returncode == 0, chat.stderr
    # Two prompts, two replies: the conversation went on with its history.
    assert chat.stdout.count("> ") >= 2
    assert len(chat.stdout.replace("> ", "").strip()) > 0


def test_stream_chat_without_a_server_is_a_clear_error() -> None:
    with pytest.raises(BackpropError) as err:
        list(stream_chat(f"http://127.0.0.1:{free_port()}", [{"role": "user", "content": "hi"}]))
    assert err.value.code == ErrorCode.RUNTIME_INTERNAL
    assert "backprop serve" in err.value.hint


def test_serve_refuses_a_missing_export(tmp_path: Path) -> None:
    out = subprocess.run([*BACKPROP, "serve", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "[STATE_NOT_FOUND]" in out.stderr
