"""The runs page: every run with live status, progress, loss, speed, ETA and actions."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Any

import reflex as rx

from backpropagate.errors import BackpropError
from ui_app.components.layout import page
from ui_app.components.status import progress, status_badge
from ui_app.state import service
from ui_app.state.runview import format_duration

REFRESH_S = 1.0
STATUSES = ["all", "queued", "running", "paused", "completed", "failed", "cancelled", "interrupted"]


def run_row(run: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """One table row from a store record: display strings, and the progress as a percentage."""
    now = now or time.time()
    step, total = int(run.get("step") or 0), int(run.get("total_steps") or 0)
    started = run.get("started_at")
    eta = None
    if run.get("status") == "running" and started and step and total > step:
        eta = (now - started) / step * (total - step)
    loss, tps = run.get("loss"), run.get("tokens_per_s")
    gpus = run.get("gpus") or []
    return {
        "id": str(run["id"]),
        "name": str(run.get("name") or (run.get("config") or {}).get("name") or run["id"]),
        "model": str((run.get("config") or {}).get("model", "")),
        "status": str(run.get("status", "")),
        "progress": int(100 * step / total) if total else (100 if run.get("status") == "completed" else 0),
        "steps": f"{step}/{total}" if total else str(step),
        "loss": "" if loss is None else f"{loss:.4f}",
        "tps": "" if tps is None else f"{tps:,.0f}",
        "eta": format_duration(eta),
        "gpu": ",".join(str(g) for g in gpus) if gpus else "CPU",
        "started": datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M") if started else "",
        "active": "1" if run.get("status") in ("queued", "running", "paused") else "",
        "resumable": "1" if run.get("status") in ("cancelled", "failed", "interrupted") else "",
    }


class RunsState(rx.State):
    runs: list[dict[str, Any]] = []
    status_filter: str = "all"
    message: str = ""
    confirm_delete: str = ""
    watching: bool = False
    _task: str = ""

    @rx.event
    def start(self) -> Any:
        self.watching = True
        if not self._task:
            return RunsState.watch

    @rx.event
    def leave(self) -> None:
        self.watching = False

    @rx.event
    async def set_filter(self, value: str) -> None:
        self.status_filter = value
        await self._refresh()

    async def _refresh(self) -> None:
        try:
            rows = await service.list_runs(None if self.status_filter == "all" else self.status_filter)
        except BackpropError as exc:
            self.message = f"[{exc.code}] {exc.message}"
            return
        rows.sort(key=lambda r: r.get("created_at") or 0, reverse=True)
        self.runs = [run_row(r) for r in rows]

    @rx.event(background=True)
    async def watch(self) -> None:
        async with self:
            if self._task:
                return
            mine = self._task = uuid.uuid4().hex
        try:
            while True:
                async with self:
                    if not self.watching:
                        if self._task == mine:  # under the same lock, so a page opened now starts one
                            self._task = ""
                        break
                    await self._refresh()
                await asyncio.sleep(REFRESH_S)
        finally:
            async with self:
                if self._task == mine:
                    self._task = ""

    async def _act(self, action: str, run_id: str) -> Any:
        try:
            new_id = await service.run_action(action, run_id)
        except BackpropError as exc:
            self.message = f"[{exc.code}] {exc.message}"
            return None
        done = {
            "stop": "Stopping run",
            "resume": "Resuming run",
            "clone": "Cloned run",
            "delete": "Deleted run",
        }
        self.message = f"{done.get(action, action)} {run_id}."
        await self._refresh()
        if action == "clone" and new_id:
            return rx.redirect(f"/runs/{new_id}")
        return None

    @rx.event
    async def stop(self, run_id: str) -> Any:
        return await self._act("stop", run_id)

    @rx.event
    async def resume(self, run_id: str) -> Any:
        return await self._act("resume", run_id)

    @rx.event
    async def clone(self, run_id: str) -> Any:
        return await self._act("clone", run_id)

    @rx.event
    def ask_delete(self, run_id: str) -> None:
        self.confirm_delete = run_id

    @rx.event
    def cancel_delete(self) -> None:
        self.confirm_delete = ""

    @rx.event
    async def delete(self) -> Any:
        run_id, self.confirm_delete = self.confirm_delete, ""
        return await self._act("delete", run_id)


def _actions(run: rx.Var) -> rx.Component:
    return rx.hstack(
        rx.link(rx.button("Open", size="1", variant="soft"), href="/runs/" + run["id"].to(str)),
        rx.cond(
            run["active"] != "",
            rx.button(
                "Stop", size="1", color_scheme="red", variant="soft", on_click=RunsState.stop(run["id"])
            ),
        ),
        rx.cond(
            run["resumable"] != "",
            rx.button("Resume", size="1", variant="soft", on_click=RunsState.resume(run["id"])),
        ),
        rx.button("Clone", size="1", variant="outline", on_click=RunsState.clone(run["id"])),
        rx.button(
            "Delete",
            size="1",
            variant="ghost",
            color_scheme="red",
            on_click=RunsState.ask_delete(run["id"]),
            disabled=run["active"] != "",
            aria_label="Delete run " + run["name"].to(str),
        ),
        spacing="1",
        wrap="wrap",
    )


def _row(run: rx.Var) -> rx.Component:
    return rx.table.row(
        rx.table.cell(
            rx.link(run["name"], href="/runs/" + run["id"].to(str), weight="medium"),
            rx.text(run["model"], size="1", color_scheme="gray"),
        ),
        rx.table.cell(status_badge(run["status"].to(str))),
        rx.table.cell(progress(run["progress"].to(int)), rx.text(run["steps"], size="1")),
        rx.table.cell(run["loss"]),
        rx.table.cell(run["tps"]),
        rx.table.cell(run["eta"]),
        rx.table.cell(run["gpu"]),
        rx.table.cell(run["started"]),
        rx.table.cell(_actions(run)),
        class_name="run-row",
        custom_attrs={"data-run-id": run["id"]},
    )


def _delete_dialog() -> rx.Component:
    return rx.alert_dialog.root(
        rx.alert_dialog.content(
            rx.alert_dialog.title("Delete run?"),
            rx.alert_dialog.description(
                "This removes run ",
                RunsState.confirm_delete,
                " with its checkpoints and logs. It cannot be undone.",
            ),
            rx.hstack(
                rx.alert_dialog.cancel(rx.button("Cancel", variant="soft", on_click=RunsState.cancel_delete)),
                rx.alert_dialog.action(
                    rx.button("Delete", color_scheme="red", on_click=RunsState.delete, id="confirm-delete")
                ),
                spacing="3",
                justify="end",
                margin_top="1em",
            ),
        ),
        open=RunsState.confirm_delete != "",
    )


def runs_page() -> rx.Component:
    return rx.fragment(
        page(
            "Runs",
            rx.hstack(
                rx.select(
                    STATUSES,
                    value=RunsState.status_filter,
                    on_change=RunsState.set_filter,
                    aria_label="Filter by status",
                ),
                rx.link(rx.button("New run", id="new-run-link"), href="/new"),
                rx.text(RunsState.message, size="2", color_scheme="gray", id="runs-message"),
                spacing="3",
                align="center",
                margin_bottom="1em",
                wrap="wrap",
            ),
            rx.cond(
                RunsState.runs.length() > 0,
                rx.box(
                    # On a phone the table is wider than the screen: say that it scrolls to its actions.
                    rx.text(
                        "Swipe the table sideways for more columns and each run's actions →",
                        size="1",
                        color_scheme="gray",
                        display=rx.breakpoints(initial="block", md="none"),
                        id="runs-scroll-hint",
                        margin_bottom="0.25em",
                    ),
                    rx.table.root(
                        rx.table.header(
                            rx.table.row(
                                *[
                                    rx.table.column_header_cell(h)
                                    for h in (
                                        "Run",
                                        "Status",
                                        "Progress",
                                        "Loss",
                                        "Tokens/s",
                                        "ETA",
                                        "GPU",
                                        "Started",
                                        "",
                                    )
                                ]
                            )
                        ),
                        rx.table.body(rx.foreach(RunsState.runs, _row)),
                        variant="surface",
                        size="1",
                        id="runs-table",
                    ),
                    overflow_x="auto",
                    width="100%",
                ),
                rx.text("No runs yet. Start one from New run.", id="no-runs"),
            ),
            _delete_dialog(),
            on_mount=RunsState.start,
        ),
        on_unmount=RunsState.leave,
    )
