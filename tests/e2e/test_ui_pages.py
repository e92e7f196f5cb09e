"""The web app in a real browser against the real `backprop ui` server: data, a live run, compare.

The tests in this module run in order on one signed-in page: each step builds on the last
(upload → start → watch → stop → resume → reload → complete → clone → compare).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
pytestmark = [pytest.mark.browser, pytest.mark.slow]

DOCS_IMAGES = REPO / "docs" / "images"
EXAMPLES = REPO / "examples"
# Small enough to finish in a minute or two on a CPU, long enough to stop and resume mid-run.
RUN_STEPS = 30
STATE: dict[str, str] = {}


def shot(page: Page, name: str, docs: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"ui-{name}.png"
    page.mouse.move(0, 0)  # no chart tooltip left open under the pointer
    page.screenshot(path=str(path), full_page=True)
    if docs:
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMAGES / f"{name}.png")


def points(page: Page) -> int:
    return int(page.inner_text("#point-count").split()[0])


def wait_points(page: Page, at_least: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = points(page)
        if n >= at_least:
            return n
        page.wait_for_timeout(500)
    raise AssertionError(f"the loss chart stayed at {points(page)} points (wanted {at_least})")


def status(page: Page) -> str:
    return page.locator(".run-status").first.inner_text().strip().lower()  # badges show labels


def wait_status(page: Page, wanted: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if status(page) in wanted:
            return status(page)
        page.wait_for_timeout(500)
    raise AssertionError(f"status stayed {status(page)!r}, wanted one of {sorted(wanted)}")


def test_header_shows_mode_and_pages_render(ui: Page, ui_server) -> None:  # noqa: ANN001
    ui.goto(ui_server.base + "/")
    expect(ui.locator("#mode-badge")).to_have_text("Local", timeout=20000)
    expect(ui.locator("#no-runs")).to_be_visible()
    # the logo is the tab's icon, inlined: no /favicon.ico request that ends in a 404
    expect(ui.locator("link[rel=icon]")).to_have_attribute("href", re.compile(r"^data:image/svg\+xml,"))
    shot(ui, "runs-empty")
    ui.goto(ui_server.base + "/chat")
    # with no GGUF export yet the page points to Export; once one exists it offers the chat form
    expect(ui.locator("#chat-no-exports").or_(ui.locator("#chat-input")).first).to_be_visible(timeout=20000)
    shot(ui, "chat")
    ui.goto(ui_server.base + "/export")
    expect(ui.locator("#export-no-runs")).to_be_visible()
    # an address the app does not have is a page with a way back; /runs is the runs list
    ui.goto(ui_server.base + "/no-such-page")
    expect(ui.locator("#not-found")).to_contain_text("/no-such-page", timeout=20000)
    shot(ui, "not-found")
    ui.locator("#not-found").get_by_role("button", name="All runs").click()
    expect(ui.locator("#no-runs")).to_be_visible(timeout=20000)
    ui.goto(ui_server.base + "/runs")
    expect(ui.locator("#no-runs")).to_be_visible(timeout=20000)
    # an unknown run says so instead of showing an empty page
    ui.goto(ui_server.base + "/runs/20990101-000000-0000")
    expect(
        ui.get_by_text("STATE_RUN_NOT_FOUND", exact=False).or_(ui.get_by_text("No run", exact=False)).first
    ).to_be_visible(timeout=20000)
    expect(ui.locator("#stop-run")).to_be_disabled()
    # the theme switch flips the page between light and dark
    dark_before = ui.evaluate("document.documentElement.classList.contains('dark')")
    ui.get_by_role("button", name="Toggle light and dark theme").click()
    expect(ui.locator("html")).to_have_class(re.compile(r"\blight\b" if dark_before else r"\bdark\b"))
    shot(ui, "unknown-run-theme")
    ui.get_by_role("button", name="Toggle light and dark theme").click()


def test_upload_shows_validation_errors_with_line_numbers(ui: Page, ui_server, tmp_path) -> None:  # noqa: ANN001
    ui.goto(ui_server.base + "/new")
    start = ui.locator("#start-run")
    expect(start).to_be_disabled(timeout=20000)  # no data yet
    expect(ui.locator("#start-blocked")).to_contain_text("Choose a data set")
    ui.set_input_files("#dataset-upload input[type=file]", str(EXAMPLES / "bad_rows.jsonl"))
    errors = ui.locator("#data-errors")
    expect(errors).to_be_visible(timeout=60000)
    # Each bad row by its line, in the uploaded file's own name, with what was expected there.
    expect(errors).to_contain_text("bad_rows.jsonl, line 3")
    expect(errors).to_contain_text("line 5: message 2: two user messages in a row (expected assistant)")
    expect(errors).not_to_contain_text("ds-")  # never the server's copy
    expect(start).to_be_disabled()
    expect(ui.locator("#start-blocked")).to_contain_text("bad rows")
    shot(ui, "new-run-errors")
    # A file of another shape: no usable rows, the keys it has and the formats it could be.
    wrong = tmp_path / "questions.jsonl"
    wrong.write_text('{"question": "hi", "answer": "hello"}\n{"question": "and?"}\n')
    ui.set_input_files("#dataset-upload input[type=file]", str(wrong))
    expect(errors).to_contain_text("questions.jsonl", timeout=60000)
    expect(errors).to_contain_text("keys seen: 'question', 'answer'")
    expect(errors).to_contain_text("expected one of: sharegpt, openai, alpaca")
    expect(start).to_be_disabled()
    expect(ui.locator("#start-blocked")).to_contain_text("No usable rows")
    shot(ui, "new-run-wrong-format")


def test_upload_shows_preview_and_starts_a_run(ui: Page, ui_server) -> None:  # noqa: ANN001
    ui.goto(ui_server.base + "/new")
    ui.set_input_files("#dataset-upload input[type=file]", str(EXAMPLES / "quickstart.jsonl"))
    expect(ui.locator("#data-preview .chat-bubble").first).to_be_visible(timeout=60000)
    expect(ui.locator("#data-summary")).to_contain_text("usable rows")
    expect(ui.locator("#data-errors")).to_have_count(0)
    expect(ui.locator("#token-histogram")).to_be_visible()
    expect(ui.locator("#memory-estimate")).to_contain_text("Estimated peak memory")
    # A demo model: the fields show the demo sizing the run will really use, not the general defaults.
    expect(ui.locator("#demo-note")).to_contain_text("batch 1 × 1")
    for field, value in (("batch_size", "1"), ("grad_accum", "1"), ("lr", "0.005"), ("steps", "150")):
        expect(ui.locator(f"#field-{field}")).to_have_value(value)
    expect(ui.locator("#start-run")).to_be_enabled()
    ui.fill("#field-name", "e2e first")
    ui.fill("#field-steps", str(RUN_STEPS))
    ui.fill("#field-max_seq_len", "64")
    ui.click("text=Advanced settings")
    ui.fill("#field-save_every", "5")
    ui.fill("#field-eval_every", "10")
    # Eight micro-batches a step: the run trains long enough to be watched, stopped and reloaded.
    ui.fill("#field-batch_size", "1")
    ui.fill("#field-grad_accum", "8")
    shot(ui, "new-run", docs=True)
    ui.click("#start-run")
    ui.wait_for_url(re.compile(r".*/runs/[\w-]+$"), timeout=30000)
    STATE["run"] = ui.url.rsplit("/", 1)[1]
    expect(ui.locator("#run-name")).to_have_text("e2e first", timeout=20000)
    config = ui.request.get(f"{ui_server.base}/api/runs/{STATE['run']}").json()["config"]
    assert (config["lr"], config["batch_size"], config["grad_accum"], config["steps"]) == (
        0.005,
        1,
        8,
        RUN_STEPS,
    )


def test_loss_chart_grows_without_reload(ui: Page) -> None:
    assert "run" in STATE, "needs the run started by the previous test"
    first = wait_points(ui, 2, timeout_s=240)
    url = ui.url
    grown = wait_points(ui, first + 2, timeout_s=60)
    assert ui.url == url and grown > first
    # the chart draws the points it was given (one SVG path per series)
    expect(ui.locator("#loss-chart .recharts-line-curve").first).to_be_visible()
    shot(ui, "run-page-live")


def test_stop_then_resume(ui: Page) -> None:
    ui.click("#stop-run")
    wait_status(ui, {"cancelled"}, timeout_s=60)
    stopped_at = points(ui)
    expect(ui.locator("#timeline")).to_contain_text("Cancelled")
    shot(ui, "run-stopped")
    ui.click("#resume-run")
    wait_status(ui, {"queued", "running"}, timeout_s=30)
    wait_points(ui, stopped_at + 1, timeout_s=180)
    expect(ui.locator("#timeline")).to_contain_text("Resumed from step")
    expect(ui.locator("#action-message")).to_have_text("")  # no "Resume requested." once it runs


def test_reload_mid_run_shows_every_step(ui: Page) -> None:
    before = points(ui)
    assert status(ui) == "running", "the reload must happen while the run trains"
    ui.reload()
    wait_points(ui, max(before, 1), timeout_s=30)
    # no gap: one chart point per step so far (log_every=1), however the page was (re)loaded;
    # both numbers are read at once, as one update of the page sets them together
    count, step_text = ui.evaluate(
        "[document.querySelector('#point-count').innerText, document.querySelector('#step-text').innerText]"
    )
    n, step = int(count.split()[0]), int(step_text.split()[1])
    assert n == step, f"{n} points for step {step}"
    wait_status(ui, {"completed"}, timeout_s=300)
    expect(ui.locator("#final-metrics")).to_be_visible(timeout=20000)
    assert points(ui) == RUN_STEPS
    expect(ui.locator("#run-state")).to_have_text("Completed")  # no leftover phase ("saving")
    expect(ui.locator("#action-message")).to_have_text("")
    shot(ui, "run-page", docs=True)


def test_runs_table_and_compare_two_runs(ui: Page, ui_server) -> None:  # noqa: ANN001
    ui.click("#clone-run")
    ui.wait_for_url(lambda url: "/runs/" in url and not url.endswith(STATE["run"]), timeout=30000)
    clone = ui.url.rsplit("/", 1)[1]
    assert clone != STATE["run"]
    expect(ui.locator("#run-name")).to_have_text("e2e first (copy)", timeout=20000)
    wait_points(ui, 3, timeout_s=240)
    ui.goto(ui_server.base + "/")
    rows = ui.locator("#runs-table .run-row")
    expect(rows).to_have_count(2, timeout=20000)
    expect(ui.locator(f"[data-run-id='{STATE['run']}']")).to_contain_text("Completed")
    expect(ui.locator(f"[data-run-id='{clone}']")).to_contain_text("Running")
    shot(ui, "runs", docs=True)
    ui.goto(f"{ui_server.base}/compare?runs={STATE['run']},{clone}")
    curves = ui.locator("#compare-chart .recharts-line-curve")
    expect(curves).to_have_count(2, timeout=30000)
    # the two nearly equal curves differ in colour and in dash pattern
    looks = {(c.get_attribute("stroke"), c.get_attribute("stroke-dasharray")) for c in curves.all()}
    assert len({s for s, _ in looks}) == 2 and len({d for _, d in looks}) == 2, looks
    # the clone differs from the original by its name only
    expect(ui.locator("#config-diff")).to_contain_text("name")
    expect(ui.locator("#config-diff")).to_contain_text("(copy)")
    shot(ui, "compare", docs=True)
    # stop the clone from the runs table
    ui.goto(ui_server.base + "/")
    ui.locator(f"[data-run-id='{clone}']").get_by_role("button", name="Stop").click()
    expect(ui.locator(f"[data-run-id='{clone}']")).to_contain_text("Cancelled", timeout=60000)
    # deleting asks first; the stopped clone goes away at once, even while its worker still exits
    ui.locator(f"[data-run-id='{clone}']").get_by_role("button", name=re.compile("^Delete")).click()
    ui.click("#confirm-delete")
    expect(rows).to_have_count(1, timeout=40000)
    expect(ui.locator("#runs-message")).to_have_text(f"Deleted run {clone}.")  # no STATE_RUN_ACTIVE
    assert not (ui_server.home / "runs" / clone).exists()
    expect(ui.locator(f"[data-run-id='{STATE['run']}']")).to_be_visible()


def test_export_a_finished_run_to_gguf(ui: Page, ui_server) -> None:  # noqa: ANN001
    ui.goto(f"{ui_server.base}/runs/{STATE['run']}")  # the Export button opens this run
    ui.locator("#run-export").click()
    ui.wait_for_url(f"**/export?run={STATE['run']}")
    expect(ui.locator("#export-run")).to_contain_text("e2e first", timeout=20000)
    ui.click("#start-export")
    expect(ui.locator("#export-progress")).to_contain_text("Exporting", timeout=20000)
    result = ui.locator("#export-result")
    expect(result.or_(ui.locator("#export-error"))).to_be_visible(timeout=240000)
    shot(ui, "export", docs=True)
    expect(ui.locator("#export-error")).to_have_count(0)
    expect(result).to_contain_text(".gguf")
    expect(result).to_contain_text("mean KL")  # the GGUF was checked against the HF model
    gguf = Path(re.search(r"\S+\.gguf", result.inner_text()).group(0))
    assert gguf.is_file() and gguf.read_bytes()[:4] == b"GGUF"


# The main pages, each with an element that says it has rendered.
LAYOUT_PAGES = [
    ("runs", "/", "#runs-table"),
    ("new-run", "/new", "#start-run"),
    ("run", "/runs/{run}", "#final-metrics"),
    ("compare", "/compare?runs={run}", "#compare-chart"),
    ("export", "/export?run={run}", "#start-export"),
    ("chat", "/chat", "#chat-input, #chat-no-exports"),
]


# Buttons, fields and menus that reach past the right edge of the screen (cut off), except inside
# something that scrolls sideways on purpose (a wide table).
CONTROLS_PAST_THE_EDGE = """() => {
  const width = document.documentElement.clientWidth, cut = [];
  for (const el of document.querySelectorAll('button, input, textarea, select, a, [role=combobox]')) {
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height || r.right <= width + 1 || getComputedStyle(el).visibility === 'hidden') continue;
    let p = el.parentElement, scrolls = false;
    for (; p && !scrolls; p = p.parentElement) scrolls = ['auto', 'scroll'].includes(getComputedStyle(p).overflowX);
    if (!scrolls) cut.push((el.id ? '#' + el.id : el.tagName.toLowerCase()) + ' right=' + Math.round(r.right));
  }
  return cut.slice(0, 5);
}"""


def _theme(page: Page, theme: str) -> None:
    """Flip the header's theme switch, as a person would, until the page is in ``theme``."""
    for _ in range(3):
        if page.evaluate("document.documentElement.classList.contains('dark')") == (theme == "dark"):
            return
        page.get_by_role("button", name="Toggle light and dark theme").click()
        page.wait_for_timeout(300)
    raise AssertionError(f"the theme switch did not give {theme}")


def test_main_pages_at_phone_and_desktop_width_in_both_themes(ui: Page, ui_server) -> None:  # noqa: ANN001
    """Every main page at 390 px (a phone) and 1400 px, light and dark: nothing scrolls sideways at
    phone width, the header and the page's main element fit the screen; a screenshot of each."""
    ui.goto(ui_server.base + "/")
    expect(ui.locator("#runs-table")).to_be_visible(timeout=20000)
    try:
        for theme in ("light", "dark"):
            _theme(ui, theme)
            for width, height in ((390, 844), (1400, 900)):
                ui.set_viewport_size({"width": width, "height": height})
                for name, path, ready in LAYOUT_PAGES:
                    ui.goto(ui_server.base + path.format(run=STATE["run"]))
                    main = ui.locator(ready).first
                    expect(main).to_be_visible(timeout=20000)
                    assert ui.evaluate("document.documentElement.classList.contains('dark')") == (
                        theme == "dark"
                    )
                    overflow = ui.evaluate("document.documentElement.scrollWidth")
                    assert overflow <= width + 1, f"{name} at {width} px ({theme}) is {overflow} px wide"
                    box = main.bounding_box()
                    for _ in range(20):  # a live page may re-render its main element: measure once it is back
                        if box:
                            break
                        ui.wait_for_timeout(100)
                        box = main.bounding_box()
                    assert box and box["x"] >= 0 and box["x"] + box["width"] <= width + 1, (name, width, box)
                    if name == "compare":  # the address's one run, not the clone deleted earlier
                        expect(ui.locator("#compare-chart .recharts-line-curve")).to_have_count(1)
                    if name == "runs":  # the wide table says it scrolls, on a phone only
                        hint = expect(ui.locator("#runs-scroll-hint"))
                        if width < 768:
                            hint.to_be_visible()
                        else:
                            hint.to_be_hidden()
                    cut = ui.evaluate(CONTROLS_PAST_THE_EDGE)
                    assert not cut, f"{name} at {width} px ({theme}): controls past the screen's edge: {cut}"
                    shot(ui, f"layout-{name}-{width}-{theme}")
    finally:
        ui.set_viewport_size({"width": 1280, "height": 900})
        _theme(ui, "light")


def test_page_weight(ui: Page, ui_server) -> None:  # noqa: ANN001
    """Bytes the browser transfers for a first load of the runs page (reported, loosely bounded)."""
    sizes: list[int] = []
    context = ui.context.browser.new_context()
    page = context.new_page()
    page.on("response", lambda r: sizes.append(int(r.headers.get("content-length") or len(r.body() or b""))))
    page.goto(ui_server.login_url)
    page.wait_for_selector("#runs-table", timeout=30000)
    context.close()
    total = sum(sizes)
    (ARTIFACTS / "ui-page-weight.txt").write_text(f"{total} bytes in {len(sizes)} responses\n")
    assert 0 < total < 5 * 2**20, total
