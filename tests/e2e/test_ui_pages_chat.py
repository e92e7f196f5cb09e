"""The Export and Chat pages in a real browser: a tiny trained run, whose Chat page first points to
exporting it, exported to GGUF on the Export page (live progress bar, result, a download through the
page's own origin, an Ollama registration that fails clearly), then its replies streamed on the Chat
page in one column, in two columns side by side, and next to the run's base model exported from the
Chat page. Nothing here depends on what earlier browser tests left in the server's home."""

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


def _shot(ui: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    ui.mouse.move(0, 0)
    ui.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)


def _wait_json(ui: Page, url: str, done: set[str], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = ui.request.get(url).json()
        if body["status"] in done:
            return body
        time.sleep(1)
    raise AssertionError(f"{url} stayed {body['status']!r}")


def _trained_run(ui: Page, base: str) -> str:
    api, origin = base + "/api", {"Origin": base}  # what the app's own pages send with a cookie
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
    run = _wait_json(ui, f"{api}/runs/{created.json()['id']}", {"completed", "failed", "cancelled"}, 600)
    assert run["status"] == "completed", run
    return run["id"]


def test_export_shows_progress_then_the_result_and_a_working_download(ui: Page, ui_server) -> None:  # noqa: ANN001
    run_id = STATE["run"] = _trained_run(ui, ui_server.base)
    # The new run's Chat page says it has no GGUF yet and links to exporting it, whatever
    # exports other runs in this home may have.
    ui.goto(f"{ui_server.base}/chat?run={run_id}")
    expect(ui.locator("#chat-run-no-export")).to_contain_text(
        "chat e2e has no GGUF export yet", timeout=20000
    )
    link = ui.locator("#chat-run-export-link")
    expect(link).to_have_attribute("href", f"/export?run={run_id}")
    link.click()
    ui.wait_for_url(f"**/export?run={run_id}")
    expect(ui.locator("#export-run")).to_contain_text("chat e2e", timeout=20000)
    ui.click("#start-export")  # gguf q8_0, verified: the page's defaults
    expect(ui.locator("#export-progress-bar")).to_be_visible(timeout=20000)
    expect(ui.locator("#export-progress")).to_contain_text("Exporting")
    result = ui.locator("#export-result")
    expect(result.or_(ui.locator("#export-error"))).to_be_visible(timeout=240000)
    expect(ui.locator("#export-error")).to_have_count(0)
    expect(result).to_contain_text("mean KL")
    expect(result).to_contain_text("top-1 agreement")
    _shot(ui, "export-done")

    link = result.locator("a.export-download[data-file$='.gguf']")
    expect(link).to_have_count(1)
    href = link.get_attribute("href")
    assert href.startswith("/api/exports/") and "download?file=" in href, href  # relative: any origin
    with ui.expect_download() as download_info:
        link.click()  # what a person does: the browser saves the file, the app does not route
    saved = Path(download_info.value.path())
    assert saved.read_bytes()[:4] == b"GGUF" and saved.stat().st_size > 1000
    expect(ui.locator("#export-result")).to_be_visible()  # still on the Export page, no 404
    STATE["export"] = link.get_attribute("data-export")


def test_an_unreachable_ollama_is_a_clear_error_and_earlier_exports_stay_listed(ui: Page, ui_server) -> None:  # noqa: ANN001
    ui.fill("#export-ollama-name", "tiny-e2e")
    ui.click("#export-verify")  # off: only the registration matters here
    ui.click("#start-export")
    error = ui.locator("#export-error")
    expect(error).to_contain_text("DEP_OLLAMA_REGISTRATION_FAILED", timeout=240000)
    expect(error).to_contain_text("hint:")
    expect(error.locator("a.export-download[data-file$='.gguf']")).to_have_count(1)  # the GGUF is kept
    _shot(ui, "export-ollama-error")

    ui.reload()  # nothing is lost: both exports are read back from their folders
    expect(ui.locator("#export-error")).to_contain_text("DEP_OLLAMA_REGISTRATION_FAILED", timeout=20000)
    earlier = ui.locator("#export-list .export-earlier")
    expect(earlier).to_have_count(1)
    expect(earlier).to_contain_text("completed")
    expect(earlier.locator("a.export-download[data-file$='.gguf']")).to_have_count(1)
    expect(ui.locator("a.export-download[data-file$='.gguf']")).to_have_count(2)


def test_a_trained_runs_gguf_export_answers_streamed(ui: Page, ui_server) -> None:  # noqa: ANN001
    ui.goto(f"{ui_server.base}/chat?run={STATE['run']}")  # this run's export, whatever else exists
    expect(ui.locator("#chat-model-left")).to_contain_text(STATE["export"], timeout=20000)
    ui.fill("#chat-input", "What is fine-tuning?")
    ui.press("#chat-input", "Enter")  # Enter sends, as in any chat
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
    _shot(ui, "chat")


def test_the_base_model_answers_next_to_the_export_on_the_chat_page(ui: Page, ui_server) -> None:  # noqa: ANN001
    ui.goto(f"{ui_server.base}/chat?run={STATE['run']}")  # this run's export, whatever else exists
    expect(ui.locator("#chat-model-left")).to_contain_text("chat e2e · q8_0", timeout=20000)
    ui.click("#chat-base-export")
    right = ui.locator("#chat-model-right")
    expect(ui.locator("#chat-base-progress").or_(right.filter(has_text="base model of"))).to_be_visible(
        timeout=20000
    )
    expect(right).to_contain_text("base model of chat e2e · q8_0", timeout=240000)
    expect(ui.locator("#chat-base-error")).to_have_count(0)
    ui.fill("#chat-input", "What is fine-tuning?")
    ui.click("#chat-send")
    for col in ("left", "right"):
        expect(ui.locator(f"#chat-log-{col} .chat-user").last).to_have_text(
            "What is fine-tuning?", timeout=20000
        )
    expect(ui.locator("#chat-send")).to_be_enabled(timeout=180000)  # both replies have finished streaming
    expect(ui.locator("#chat-error")).to_have_count(0)
    answers = [
        ui.locator(f"#chat-log-{col} .chat-assistant").last.inner_text().strip() for col in ("left", "right")
    ]
    assert all(a and a != "…" for a in answers), answers
    _shot(ui, "chat-base-model")
    # The docs show the trained model answering next to its base model.
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    shutil.copy(ARTIFACTS / "ui-chat-base-model.png", DOCS_IMAGES / "chat.png")

    # Asking again reuses the finished base export at once.
    ui.click("#chat-base-export")
    expect(right).to_contain_text("base model of", timeout=20000)
    base_exports = list(ui_server.home.glob(f"runs/{STATE['run']}/exports/gguf-q8_0-base-*"))
    assert len(base_exports) == 1, base_exports
