"""The Chat page in a real browser: a tiny trained run exported to an f16 GGUF answers, streamed, in one
column and then in two columns side by side."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
DOCS_IMAGES = REPO / "docs" / "images"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
STATE: dict[str, str] = {}


def _wait_json(ui: Page, url: str, done: set[str], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = ui.request.get(url).json()
        if body["status"] in done:
            return body
        time.sleep(1)
    raise AssertionError(f"{url} stayed {body['status']!r}")


def test_no_export_yet_points_to_the_export_page(ui: Page, ui_server) -> None:  # noqa: ANN001
    if any(ui_server.home.glob("runs/*/exports/*/*.gguf")):
        pytest.skip("an earlier browser test already exported a GGUF in this server's home")
    ui.goto(ui_server.base + "/chat")
    expect(ui.locator("#chat-no-exports")).to_contain_text("No GGUF export yet", timeout=20000)
    expect(ui.locator("#chat-export-link")).to_have_attribute("href", "/export")


def test_a_trained_runs_gguf_export_answers_streamed(ui: Page, ui_server) -> None:  # noqa: ANN001
    api = ui_server.base + "/api"
    origin = {"Origin": ui_server.base}  # what the app's own pages send with a cookie-signed request
    data = (REPO / "examples" / "quickstart.jsonl").read_bytes()
    upload = ui.request.post(
        f"{api}/datasets",
        multipart={"file": {"name": "chat.jsonl", "mimeType": "application/json", "buffer": data}},
        headers=origin,
    )
    assert upload.status == 201, upload.text()
    config = {
        "name": "chat e2e",
        "model": "demo-qwen2",
        "data": upload.json()["id"],
        "steps": 4,
        "max_seq_len": 64,
    }
    created = ui.request.post(f"{api}/runs", data=config, headers=origin)
    assert created.status == 201, created.text()
    run_id = created.json()["id"]
    run = _wait_json(ui, f"{api}/runs/{run_id}", {"completed", "failed", "cancelled"}, 600)
    assert run["status"] == "completed", run
    job = ui.request.post(
        f"{api}/runs/{run_id}/exports",
        data={"format": "gguf", "quantization": "f16", "verify": False},
        headers=origin,
    )
    assert job.status == 202, job.text()
    export = _wait_json(ui, f"{api}/exports/{job.json()['id']}", {"completed", "failed"}, 300)
    assert export["status"] == "completed", export
    STATE["export"] = export["id"]

    ui.goto(ui_server.base + "/chat")
    expect(ui.locator("#chat-model-left")).to_contain_text(export["id"], timeout=20000)
    ui.fill("#chat-input", "What is fine-tuning?")
    ui.click("#chat-send")
    expect(ui.locator("#chat-log-left .chat-user")).to_have_text("What is fine-tuning?", timeout=20000)
    reply = ui.locator("#chat-log-left .chat-assistant").first
    expect(reply).to_be_visible(timeout=20000)
    expect(ui.locator("#chat-send")).to_be_enabled(timeout=180000)  # the reply has finished streaming
    expect(ui.locator("#chat-error")).to_have_count(0)
    text = reply.inner_text().strip()
    assert text and text != "…", text


def test_two_models_answer_the_same_conversation(ui: Page) -> None:
    ui.click("#chat-model-right")
    ui.get_by_role("option", name=STATE["export"]).first.click()
    expect(ui.locator("#chat-log-right")).to_be_visible(timeout=20000)
    ui.fill("#chat-input", "What is fine-tuning?")
    ui.click("#chat-send")
    for col in ("left", "right"):
        expect(ui.locator(f"#chat-log-{col} .chat-user").last).to_have_text(
            "What is fine-tuning?", timeout=20000
        )
    expect(ui.locator("#chat-send")).to_be_enabled(timeout=180000)
    assert ui.locator("#chat-log-left .chat-assistant").count() == 2  # the first exchange is kept
    answers = [
        ui.locator(f"#chat-log-{col} .chat-assistant").last.inner_text().strip() for col in ("left", "right")
    ]
    # Each column finished: streamed text, or the note that the tiny model stopped at once.
    assert all(a and a != "…" for a in answers), answers
    assert any("ended its reply without any text" not in a for a in answers), answers
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "ui-chat.png"
    ui.mouse.move(0, 0)
    ui.screenshot(path=str(path), full_page=True)
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, DOCS_IMAGES / "chat.png")
