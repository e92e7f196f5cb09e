"""The Chat page builds, lists only finished GGUF exports, and streams a reply from a real model server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_export_support import qwen2_run  # noqa: F401 - fixture

from backpropagate.settings import get_settings
from ui_app.pages.chat import chat_page
from ui_app.state import export as export_state
from ui_app.state.chat import Reply, gguf_choices, history


def _rendered() -> str:
    return json.dumps(chat_page().render(), default=str)


def test_page_builds_with_inputs_columns_and_the_no_export_message() -> None:
    text = _rendered()
    for needed in (
        "chat-input",
        "chat-send",
        "chat-clear",
        "chat-model-left",
        "chat-model-right",
        "chat-log-left",
    ):
        assert needed in text, needed
    assert "chat-no-exports" in text and "chat-export-link" in text  # the no-export message links to Export
    assert "chat-missing" not in text  # the old "not available" page is gone


def test_choices_keep_only_completed_gguf_exports_newest_first() -> None:
    states = [
        {
            "id": "gguf-f16-a",
            "run_id": "r1",
            "status": "completed",
            "path": "/x/m.gguf",
            "created_at": 1.0,
            "quantization": "f16",
        },
        {
            "id": "gguf-q8_0-b",
            "run_id": "r2",
            "status": "completed",
            "path": "/x/n.gguf",
            "created_at": 3.0,
            "quantization": "q8_0",
        },
        {"id": "gguf-f16-c", "run_id": "r1", "status": "running", "path": None, "created_at": 4.0},
        {"id": "gguf-f16-d", "run_id": "r1", "status": "failed", "path": None, "created_at": 5.0},
        {"id": "merged-f16-e", "run_id": "r1", "status": "completed", "path": "/x/merged", "created_at": 6.0},
    ]
    states.append(
        {
            "id": "gguf-f16-base-f",
            "run_id": "r1",
            "status": "completed",
            "path": "/x/r1-base-f16.gguf",
            "created_at": 2.0,
            "quantization": "f16",
            "base_model": True,
        }
    )
    out = gguf_choices(states, {"r1": "my run"})
    assert [c["id"] for c in out] == ["gguf-q8_0-b", "gguf-f16-base-f", "gguf-f16-a"]
    assert out[1]["label"] == "base model of my run · f16 (gguf-f16-base-f)" and out[1]["base"] == "yes"
    assert out[1]["run_id"] == "r1" and out[1]["quantization"] == "f16"
    out.pop(1)
    assert out[0]["label"] == "r2 · q8_0 (gguf-q8_0-b)"  # a run without a name shows its id
    assert out[1]["label"] == "my run · f16 (gguf-f16-a)"


def test_history_sends_the_turns_with_text_and_drops_the_pending_bubble() -> None:
    msgs = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "error": ""},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": ""},
    ]
    assert history(msgs) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again"},
    ]


def test_a_reply_from_an_unknown_export_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    from backpropagate.export.jobs import ExportJobs

    monkeypatch.setattr(export_state.service, "_api_state", None)  # no API app beside the pages
    monkeypatch.setattr(export_state, "_local_jobs", ExportJobs(get_settings()))
    reply = Reply("gguf-f16-00000000", [{"role": "user", "content": "hi"}])
    reply.run()
    assert reply.done.is_set() and reply.text == ""
    assert reply.error.startswith("[STATE_NOT_FOUND]") and "gguf-f16-00000000" in reply.error


def test_a_reply_streams_from_the_exports_model_server(
    monkeypatch: pytest.MonkeyPatch,
    qwen2_run: Path,  # noqa: F811
) -> None:
    pytest.importorskip("llama_cpp.server")
    from backpropagate.export.jobs import ExportJobs

    jobs = ExportJobs(get_settings())
    monkeypatch.setattr(export_state.service, "_api_state", None)  # no API app beside the pages
    monkeypatch.setattr(export_state, "_local_jobs", jobs)
    run = SimpleNamespace(id=qwen2_run.name, status="completed", config={})
    try:
        state = jobs.start(run, "gguf", "f16", verify=False)
        deadline = time.monotonic() + 300
        while state["status"] == "running" and time.monotonic() < deadline:
            time.sleep(1)
            state = jobs.status(state["id"])
        assert state["status"] == "completed", state
        assert [c["id"] for c in gguf_choices(jobs.list_for_run(run.id), {})][0] == state["id"]

        reply = Reply(state["id"], [{"role": "user", "content": "What is fine-tuning?"}])
        reply.run(max_tokens=12)
        assert reply.error == ""
        assert len(reply.pieces) >= 2 and reply.text.strip()  # streamed piece by piece
        assert jobs.status(state["id"])["base_url"]  # the server stays up for the next message

        again = Reply(state["id"], history([*reply.messages, {"role": "assistant", "content": reply.text}]))
        again.messages.append({"role": "user", "content": "And again"})
        again.run(max_tokens=8)
        assert again.error == "" and again.text.strip()
    finally:
        jobs.close()
