"""The live run page: loss curve, metrics, GPU panel, timeline, log tail, and run controls."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import reflex as rx

from backpropagate.errors import BackpropError
from backpropagate.events import ACTIVE_STATUSES
from backpropagate.logs import get_logger
from ui_app.components.charts import loss_chart, metric_chart
from ui_app.components.layout import page
from ui_app.components.panels import gpu_panel, log_tail, stat, timeline
from ui_app.components.status import progress, status_badge
from ui_app.state import service
from ui_app.state.runview import RunView, human_label, status_text

# At most this many state pushes per second reach the browser, however fast events arrive.
PUSH_INTERVAL_S = 0.4
STORE_CHECK_S = 2.0
ACTIVE = frozenset(str(s) for s in ACTIVE_STATUSES)
log = get_logger(__name__)


class RunDetailState(rx.State):
    """What the run page shows; filled by one background task that follows the hub's stream."""

    run_id: str = ""
    name: str = ""
    summary: dict[str, Any] = {}
    chart: list[dict[str, Any]] = []
    timeline: list[dict[str, str]] = []
    gpus: list[dict[str, Any]] = []
    final: dict[str, str] = {}
    checkpoints: list[dict[str, str]] = []
    log: str = ""
    last_seq: int = 0
    points: int = 0
    preference: bool = False  # a preference objective: reward margin and accuracy are charted
    message: str = ""
    error: str = ""
    following: bool = False
    # Backend only: the run the background task follows (not sent to the browser).
    _task_run: str = ""

    @rx.var
    def status(self) -> str:
        return str(self.summary.get("status", ""))

    @rx.var
    def can_stop(self) -> bool:
        return self.status in ("queued", "running", "paused")

    @rx.var
    def can_resume(self) -> bool:
        return self.status in ("cancelled", "failed", "interrupted")

    @rx.event
    def open_run(self) -> Any:
        # Ask the browser for its path: after a client-side navigation the router data of a
        # mount event can still describe the previous page.
        return rx.call_script("window.location.pathname", callback=RunDetailState.open_path)

    @rx.event
    def open_path(self, path: str) -> Any:
        parts = [p for p in str(path).split("/") if p]
        if len(parts) != 2 or parts[0] != "runs":
            return None
        run_id = parts[1]
        if run_id != self.run_id:
            self.reset()
            self.run_id = run_id
        self.following = True
        if self._task_run.split("#")[0] != run_id:
            return RunDetailState.follow
        return None

    @rx.event
    def leave(self) -> None:
        self.following = False

    @rx.event(background=True)
    async def follow(self) -> None:
        """Follow the hub's stream of the run (history, then live); push at most every PUSH_INTERVAL_S."""
        async with self:
            run_id = self.run_id
            if self._task_run.split("#")[0] == run_id or not run_id:
                return
            # a token of its own, so a task that ends never clears the marker of its successor
            mine = self._task_run = f"{run_id}#{uuid.uuid4().hex}"
        view = RunView(run_id=run_id)
        seen = {"changed": False, "row": {}}
        reader = asyncio.create_task(_read_stream(view, seen))
        try:
            store_checked = 0.0
            while True:
                changed, seen["changed"] = seen["changed"], False
                now = time.monotonic()
                if now - store_checked > STORE_CHECK_S:
                    store_checked = now
                    try:
                        seen["row"] = await service.get_run(run_id)
                    except BackpropError as exc:
                        seen["row"] = {"error": f"[{exc.code}] {exc.message}"}
                    except Exception:  # noqa: BLE001 - the events alone still draw the page
                        seen["row"] = {}
                    changed = True
                text = await service.log_tail(run_id) if changed else None
                async with self:
                    if not self.following or self.run_id != run_id:
                        # cleared under the same lock, so a page opened now starts a new task
                        if self._task_run == mine:
                            self._task_run = ""
                        break
                    if changed:
                        self._push(view, seen["row"], text)
                await asyncio.sleep(PUSH_INTERVAL_S)
        finally:
            reader.cancel()
            async with self:
                if self._task_run == mine:
                    self._task_run = ""

    def _push(self, view: RunView, row: dict[str, Any], log_text: str | None) -> None:
        summary = view.summary()
        # The store knows what the log cannot say (a worker that died, a queued resume); trust it
        # when it has seen at least the events this page has.
        if row.get("status") and int(row.get("last_seq") or 0) >= view.last_seq:
            summary["status"] = row["status"]
        self.error = row.get("error", "") if not view.last_seq else ""
        if self.error:
            summary["status"] = "unknown"  # neither the store nor a log knows this run
        if summary["status"] != self.summary.get("status"):
            self.message = ""  # "Resume requested." is over once the status moves on
        summary["state_text"] = status_text(summary["status"], summary["phase"])
        self.name = row.get("name") or (view.config or {}).get("name") or view.run_id
        self.summary = summary
        self.chart = view.chart_points()
        self.points = len(view.steps)
        self.preference = view.preference
        self.timeline = list(reversed(view.timeline))
        self.gpus = view.gpus
        self.final = {human_label(k): _fmt(v) for k, v in view.final.items() if v is not None}
        self.checkpoints = [{k: str(v) for k, v in c.items()} for c in view.checkpoints[-5:]]
        self.last_seq = view.last_seq
        if log_text is not None:
            self.log = log_text

    async def _action(self, action: str) -> Any:
        try:
            new_id = await service.run_action(action, self.run_id)
        except BackpropError as exc:
            self.message = f"[{exc.code}] {exc.message}"
            return None
        self.message = {"stop": "Stop requested.", "resume": "Resume requested.", "clone": "Cloned."}.get(
            action, ""
        )
        if action == "clone" and new_id:
            # same page component, so no new mount event: switch the followed run explicitly
            return [rx.redirect(f"/runs/{new_id}"), RunDetailState.open_path(f"/runs/{new_id}")]
        return None

    @rx.event
    async def stop(self) -> Any:
        return await self._action("stop")

    @rx.event
    async def resume(self) -> Any:
        return await self._action("resume")

    @rx.event
    async def clone(self) -> Any:
        return await self._action("clone")


async def _read_stream(view: RunView, seen: dict[str, Any]) -> None:
    """Fold the run's stream into ``view`` as events arrive; the push loop sends what changed.

    The stream ends with the run; a resume queues it again (the store row, polled by the push
    loop, says so), and the stream is followed again from the last seq seen.
    """
    while True:
        try:
            async for event in service.follow_events(view.run_id, view.last_seq):
                if view.apply(event):
                    seen["changed"] = True
        except BackpropError:
            pass  # no such run (yet): the store row shows the error; try again later
        except Exception:  # noqa: BLE001 - a broken stream must not freeze the page for good
            log.exception("following run %s failed; following it again", view.run_id)
        while True:
            await asyncio.sleep(STORE_CHECK_S)
            if seen["row"].get("status") in ACTIVE:
                break


def _fmt(value: Any) -> str:
    """Metrics for people: 4 significant digits, whole numbers without a decimal point."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def _controls() -> rx.Component:
    s = RunDetailState
    return rx.hstack(
        rx.button("Stop", on_click=s.stop, disabled=~s.can_stop, color_scheme="red", id="stop-run"),
        rx.button("Resume", on_click=s.resume, disabled=~s.can_resume, id="resume-run"),
        rx.button("Clone", on_click=s.clone, variant="outline", id="clone-run"),
        rx.link("Compare", href="/compare?runs=" + s.run_id, size="2"),
        rx.link(rx.button("Export", variant="soft"), href="/export?run=" + s.run_id, id="run-export"),
        rx.link(rx.button("Chat", variant="soft"), href="/chat?run=" + s.run_id, id="run-chat"),
        rx.text(s.message, size="2", color_scheme="gray", id="action-message"),
        spacing="3",
        wrap="wrap",
        align="center",
    )


def _final() -> rx.Component:
    s = RunDetailState
    return rx.cond(
        s.final.length() > 0,
        rx.card(
            rx.heading("Result", size="3", as_="h2"),
            rx.data_list.root(
                rx.foreach(
                    s.final.entries(),
                    lambda kv: rx.data_list.item(rx.data_list.label(kv[0]), rx.data_list.value(kv[1])),
                ),
            ),
            rx.cond(
                s.checkpoints.length() > 0,
                rx.vstack(
                    rx.text("Checkpoints", weight="medium", size="2"),
                    rx.foreach(
                        s.checkpoints, lambda c: rx.text("step ", c["step"], ": ", c["path"], size="1")
                    ),
                    spacing="1",
                ),
            ),
            id="final-metrics",
        ),
    )


def run_detail_page() -> rx.Component:
    s = RunDetailState
    summary = s.summary
    return page(
        "Run",
        rx.vstack(
            rx.hstack(
                rx.heading(s.name, size="5", id="run-name"),
                status_badge(s.status),
                rx.text(summary["state_text"].to(str), size="2", color_scheme="gray", id="run-state"),
                rx.text(s.run_id, size="1", color_scheme="gray", font_family="monospace"),
                wrap="wrap",
                align="center",
                spacing="3",
            ),
            rx.cond(s.error != "", rx.callout(s.error, color_scheme="red", icon="triangle_alert")),
            _controls(),
            rx.cond(
                s.status == "queued",
                rx.callout(summary["state_text"].to(str), icon="clock", id="queued-note", width="100%"),
            ),
            rx.hstack(
                rx.text(
                    "Step ",
                    summary["step"].to(str),
                    " / ",
                    summary["total_steps"].to(str),
                    size="2",
                    white_space="nowrap",
                    id="step-text",
                ),
                progress(summary["progress"].to(int)),
                width="100%",
                align="center",
            ),
            rx.flex(
                stat("Loss", summary["loss"].to(str), "stat-loss"),
                stat("Learning rate", summary["lr"].to(str)),
                stat("Grad norm", summary["grad_norm"].to(str)),
                stat("Tokens/s", summary["tokens_per_s"].to(str), "stat-tps"),
                stat("ETA", summary["eta"].to(str)),
                stat("Micro-batch", summary["micro_batch"].to(str)),
                gap="3",
                wrap="wrap",
            ),
            rx.card(
                rx.hstack(
                    rx.heading("Loss", size="3", as_="h2"),
                    rx.text(s.points.to(str), " steps", size="1", color_scheme="gray", id="point-count"),
                    align="center",
                ),
                loss_chart(s.chart),
                width="100%",
            ),
            rx.grid(
                metric_chart(s.chart, "lr", "Learning rate", "var(--green-9)"),
                metric_chart(s.chart, "grad_norm", "Grad norm", "var(--crimson-9)"),
                metric_chart(s.chart, "tokens_per_s", "Tokens/s", "var(--cyan-9)"),
                columns=rx.breakpoints(initial="1", md="3"),
                gap="3",
                width="100%",
            ),
            rx.cond(
                s.preference,
                rx.grid(
                    metric_chart(s.chart, "reward_margin", "Reward margin", "var(--violet-9)"),
                    metric_chart(s.chart, "reward_accuracy", "Reward accuracy", "var(--grass-9)"),
                    columns=rx.breakpoints(initial="1", md="2"),
                    gap="3",
                    width="100%",
                    id="reward-charts",
                ),
            ),
            _final(),
            gpu_panel(s.gpus, summary["device"].to(str)),
            rx.grid(
                timeline(s.timeline),
                log_tail(s.log),
                columns=rx.breakpoints(initial="1", md="2"),
                gap="4",
                width="100%",
            ),
            spacing="4",
            width="100%",
        ),
        on_mount=RunDetailState.open_run,
    )


def run_detail_wrapper() -> rx.Component:
    """The page with a hook that stops following when the user navigates away."""
    return rx.fragment(run_detail_page(), on_unmount=RunDetailState.leave)
