"""Preference tuning in a real browser: DPO chosen on the New run page trains with live reward
charts; replies rated on the Chat page become a data set that the New run page lists and trains.

The Chat step needs a GGUF export. It reuses the newest one in the server's home (the Chat
module's, when it ran first in this session); otherwise it trains and exports a tiny run through
the API. With one export, both columns chat with it: the pairs are then two samples of one model.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
EXAMPLES = REPO / "examples"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _shot(ui: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    ui.mouse.move(0, 0)
    ui.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)


def _points(ui: Page) -> int:
    return int(ui.inner_text("#point-count").split()[0])


def _wait_points(ui: Page, at_least: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (n := _points(ui)) >= at_least:
            return n
        ui.wait_for_timeout(500)
    raise AssertionError(f"the charts stayed at {_points(ui)} points (wanted {at_least})")


def _pick_objective(ui: Page, objective: str) -> None:
    ui.click("#field-objective")
    ui.get_by_role("option", name=objective, exact=True).click()
    expect(ui.locator("#field-objective")).to_contain_text(objective)


def _wait_json(ui: Page, url: str, done: set[str], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = ui.request.get(url).json()
        if body["status"] in done:
            return body
        time.sleep(1)
    raise AssertionError(f"{url} stayed {body['status']!r}")


def _gguf_exports(ui: Page, base: str) -> list[str]:
    listed = []
    for run in ui.request.get(f"{base}/api/runs").json():
        listed += ui.request.get(f"{base}/api/exports?run_id={run['id']}").json()
    done = [e for e in listed if e["status"] == "completed" and str(e.get("path") or "").endswith(".gguf")]
    return [e["id"] for e in sorted(done, key=lambda e: e["created_at"], reverse=True)]


def _an_export(ui: Page, base: str) -> list[str]:
    if found := _gguf_exports(ui, base):
        return found
    api, origin = base + "/api", {"Origin": base}
    data = (EXAMPLES / "quickstart.jsonl").read_bytes()
    upload = ui.request.post(
        f"{api}/datasets",
        multipart={"file": {"name": "chat.jsonl", "mimeType": "application/json", "buffer": data}},
        headers=origin,
    )
    assert upload.status == 201, upload.text()
    config = {
        "name": "rate e2e",
        "model": "demo-qwen2",
        "data": upload.json()["id"],
        "steps": 4,
        "max_seq_len": 64,
    }
    created = ui.request.post(f"{api}/runs", data=config, headers=origin)
    assert created.status == 201, created.text()
    run = _wait_json(ui, f"{api}/runs/{created.json()['id']}", {"completed", "failed", "cancelled"}, 600)
    assert run["status"] == "completed", run
    export = ui.request.post(
        f"{api}/runs/{run['id']}/exports",
        data={"format": "gguf", "quantization": "q8_0", "verify": False},
        headers=origin,
    )
    assert export.status == 202, export.text()
    done = _wait_json(ui, f"{api}/exports/{export.json()['id']}", {"completed", "failed"}, 400)
    assert done["status"] == "completed", done
    return [done["id"]]


def _start_and_watch_rewards(ui: Page, name: str, shot: str) -> str:
    ui.click("#start-run")
    ui.wait_for_url(re.compile(r".*/runs/[\w-]+$"), timeout=30000)
    run_id = ui.url.rsplit("/", 1)[1]
    charts = ui.locator("#reward-charts")
    expect(charts).to_be_visible(timeout=60000)  # a preference run charts margin and accuracy
    first = _wait_points(ui, 2, timeout_s=240)
    # A demo DPO run takes ~20 s: the charts either grow while the page watches or the run ends.
    run_url = f"{ui.url.split('/runs/')[0]}/api/runs/{run_id}"
    deadline = time.monotonic() + 120
    while _points(ui) <= first and time.monotonic() < deadline:
        if ui.request.get(run_url).json()["status"] == "completed":
            break
        ui.wait_for_timeout(500)
    status = ui.request.get(run_url).json()["status"]
    assert _points(ui) > first or status == "completed", (first, _points(ui), status)
    expect(charts.locator(".recharts-line-curve").first).to_be_visible()
    config = ui.request.get(f"{ui.url.split('/runs/')[0]}/api/runs/{run_id}").json()["config"]
    assert config["objective"] == "dpo" and config["name"] == name, config
    _shot(ui, shot)
    return run_id


def test_dpo_chosen_on_the_new_run_page_trains_with_growing_reward_charts(ui: Page, ui_server) -> None:  # noqa: ANN001
    ui.goto(ui_server.base + "/new")
    expect(ui.locator("#field-objective")).to_contain_text("sft", timeout=20000)
    expect(ui.locator("#objective-knobs .objective-knob")).to_have_count(0)  # sft has no knobs
    _pick_objective(ui, "dpo")
    for knob in ("beta", "dpo_loss_type", "label_smoothing"):
        expect(ui.locator("#objective-knobs")).to_contain_text(knob)
    expect(ui.locator("#objective-knobs .objective-knob")).to_have_count(3)
    expect(ui.locator("#objective-knobs")).to_contain_text("strength of the pull towards the reference")
    _pick_objective(ui, "simpo")
    expect(ui.locator("#objective-knobs .objective-knob")).to_have_count(2)
    _pick_objective(ui, "dpo")
    ui.set_input_files("#dataset-upload input[type=file]", str(EXAMPLES / "preference.jsonl"))
    expect(ui.locator("#data-summary")).to_contain_text("format preference", timeout=90000)
    expect(ui.locator("#objective-fit")).to_contain_text("Fits the dpo objective")
    expect(ui.locator("#start-run")).to_be_enabled()
    ui.fill("#field-name", "e2e dpo")
    ui.fill("#field-steps", "12")
    ui.fill("#field-max_seq_len", "64")
    ui.fill("#field-beta", "0.2")
    _shot(ui, "new-run-dpo")
    run_id = _start_and_watch_rewards(ui, "e2e dpo", "run-dpo-rewards")
    config = ui.request.get(f"{ui_server.base}/api/runs/{run_id}").json()["config"]
    assert config["beta"] == 0.2


def test_rated_chat_replies_become_a_data_set_that_trains(ui: Page, ui_server) -> None:  # noqa: ANN001
    exports = _an_export(ui, ui_server.base)
    left, right = exports[0], exports[1] if len(exports) > 1 else exports[0]
    ui.goto(f"{ui_server.base}/chat")
    expect(ui.locator("#chat-model-left")).to_be_visible(timeout=20000)
    ui.click("#chat-model-left")
    ui.get_by_role("option", name=re.compile(re.escape(left))).first.click()
    ui.click("#chat-model-right")
    ui.get_by_role("option", name=re.compile(re.escape(right))).first.click()
    expect(ui.locator("#chat-log-right")).to_be_visible(timeout=20000)
    expect(ui.locator("#chat-ratings-count")).to_contain_text("0 pairs")
    prompts = [
        "What is fine-tuning?",
        "What is a GPU?",
        "Name a colour.",
        "Say hello.",
        "What is two plus two?",
    ]
    rated = 0
    for i, text in enumerate(prompts * 2):
        if rated == 3:
            break
        ui.fill("#chat-input", text)
        ui.click("#chat-send")
        expect(ui.locator("#chat-log-left .chat-user").last).to_have_text(text, timeout=20000)
        expect(ui.locator("#chat-send")).to_be_enabled(timeout=180000)  # both replies have finished
        better = ui.locator(f"#chat-better-{'left' if i % 2 == 0 else 'right'}")
        if better.count() == 0:  # a tiny model sometimes says nothing: that exchange cannot be rated
            continue
        better.click()
        rated += 1
        expect(ui.locator("#chat-ratings-count")).to_contain_text(f"{rated} pairs", timeout=20000)
        expect(better).to_be_disabled()  # one pair per exchange
        if rated == 1 and ui.locator("#chat-up-left").count():
            ui.click("#chat-up-left")  # and one reply rated alone, for KTO
            expect(ui.locator("#chat-ratings-count")).to_contain_text("1 rated replies", timeout=20000)
    assert rated == 3, "fewer than three exchanges had two replies to compare"
    expect(ui.locator("#chat-error")).to_have_count(0)
    _shot(ui, "chat-ratings")

    ui.click("#chat-train-dpo")
    ui.wait_for_url(re.compile(r".*/new\?data=ds-\w+&objective=dpo$"), timeout=20000)
    expect(ui.locator("#field-objective")).to_contain_text("dpo", timeout=20000)
    expect(ui.locator("#data-summary")).to_contain_text("chat-ratings.jsonl: 3 usable rows", timeout=90000)
    expect(ui.locator("#objective-fit")).to_contain_text("Fits the dpo objective")
    ui.fill("#field-name", "e2e rated")
    ui.fill("#field-steps", "8")
    ui.fill("#field-max_seq_len", "64")
    _shot(ui, "new-run-ratings")
    _start_and_watch_rewards(ui, "e2e rated", "run-rated-rewards")
