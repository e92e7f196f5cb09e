"""Compare runs: overlay their loss (or reward) curves and list the settings that differ."""

from __future__ import annotations

from typing import Any

import reflex as rx

from backpropagate.errors import BackpropError
from ui_app.components.charts import overlay_chart
from ui_app.components.layout import page
from ui_app.state import service
from ui_app.state.runview import MAX_CHART_POINTS, RunView, config_diff

COLORS = ["var(--indigo-9)", "var(--orange-9)", "var(--green-9)", "var(--crimson-9)", "var(--cyan-9)"]
# A dash pattern per run too: overlapping curves (a clone, a resumed run) stay tellable apart.
DASHES = ["", "8 4", "2 3", "10 3 2 3", "4 4"]
MAX_RUNS = len(COLORS)
# What can be overlaid: the loss always, the rewards when a preference run reports them.
METRICS = {"loss": "Loss", "reward_margin": "Reward margin", "reward_accuracy": "Reward accuracy"}


def overlay(curves: dict[str, list[dict[str, Any]]], key: str = "loss") -> list[dict[str, Any]]:
    """Rows {step, <run>: value, ...} on the union of steps (a run missing a step leaves a gap)."""
    by_step: dict[int, dict[str, Any]] = {}
    for run_id, points in curves.items():
        for p in points:
            if p.get(key) is not None:
                by_step.setdefault(p["step"], {"step": p["step"]})[run_id] = p[key]
    return [by_step[s] for s in sorted(by_step)]


def metrics_in(curves: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The metric labels some selected run has points for, in METRICS order."""
    return [label for key, label in METRICS.items() if any(key in p for pts in curves.values() for p in pts)]


class CompareState(rx.State):
    choices: list[dict[str, str]] = []
    selected: list[str] = []
    data: list[dict[str, Any]] = []
    series: list[dict[str, str]] = []
    diff: list[dict[str, str]] = []
    message: str = ""
    metric: str = "Loss"  # a label of METRICS
    metric_choices: list[str] = ["Loss"]

    @rx.var
    def diff_columns(self) -> list[str]:
        return ["field", *self.selected]

    @rx.event
    async def load(self) -> None:
        try:
            runs = await service.list_runs()
        except BackpropError as exc:
            self.message = f"[{exc.code}] {exc.message}"
            return
        runs.sort(key=lambda r: r.get("created_at") or 0, reverse=True)
        self.choices = [{"id": r["id"], "label": f"{r.get('name') or r['id']} ({r['status']})"} for r in runs]
        wanted = [r for r in self.router.url.query_parameters.get("runs", "").split(",") if r]
        # The address wins over an earlier visit's picks, and a deleted run is never kept selected
        # (it would show as a curve with no run and a settings table where every field differs).
        ids = {r["id"] for r in runs}
        self.selected = [r for r in (wanted or self.selected) if r in ids][:MAX_RUNS]
        await self._refresh()

    @rx.event
    async def toggle(self, run_id: str, on: bool) -> None:
        if on and run_id not in self.selected and len(self.selected) < MAX_RUNS:
            self.selected = [*self.selected, run_id]
        elif not on:
            self.selected = [r for r in self.selected if r != run_id]
        await self._refresh()

    @rx.event
    async def pick_metric(self, label: str) -> None:
        self.metric = label if label in METRICS.values() else "Loss"
        await self._refresh()

    async def _refresh(self) -> None:
        curves, configs = {}, {}
        for run_id in self.selected:
            view = RunView(run_id=run_id)
            for ev in await service.read_run_events(run_id, limit=1_000_000):
                view.apply(ev)
            curves[run_id] = view.chart_points(MAX_CHART_POINTS // max(1, len(self.selected)))
            try:
                configs[run_id] = (await service.get_run(run_id)).get("config") or view.config
            except BackpropError:
                configs[run_id] = view.config
        self.metric_choices = metrics_in(curves) or ["Loss"]
        if self.metric not in self.metric_choices:
            self.metric = "Loss"
        key = next(k for k, label in METRICS.items() if label == self.metric)
        self.data = overlay(curves, key)
        labels = {c["id"]: c["label"] for c in self.choices}
        self.series = [
            {
                "key": r,
                "color": COLORS[i % len(COLORS)],
                "dash": DASHES[i % len(DASHES)],
                "name": labels.get(r, r),
            }
            for i, r in enumerate(self.selected)
        ]
        self.diff = config_diff(configs)


def _diff_table() -> rx.Component:
    s = CompareState
    return rx.box(
        rx.heading("Settings that differ", size="3", as_="h2", margin_y="0.5em"),
        rx.cond(
            s.diff.length() > 0,
            rx.table.root(
                rx.table.header(rx.table.row(rx.foreach(s.diff_columns, rx.table.column_header_cell))),
                rx.table.body(
                    rx.foreach(
                        s.diff,
                        lambda row: rx.table.row(rx.foreach(s.diff_columns, lambda c: rx.table.cell(row[c]))),
                    )
                ),
                size="1",
                id="config-diff",
            ),
            rx.text("The selected runs have the same settings.", color_scheme="gray"),
        ),
        overflow_x="auto",
    )


def compare_page() -> rx.Component:
    s = CompareState
    return page(
        "Compare runs",
        rx.text(f"Pick up to {MAX_RUNS} runs.", size="2", color_scheme="gray"),
        rx.flex(
            rx.foreach(
                s.choices,
                lambda c: rx.checkbox(
                    c["label"],
                    checked=s.selected.contains(c["id"]),
                    on_change=lambda on: CompareState.toggle(c["id"], on),
                    class_name="compare-choice",
                ),
            ),
            gap="3",
            wrap="wrap",
            margin_y="1em",
        ),
        rx.text(s.message, color_scheme="red"),
        rx.cond(
            s.metric_choices.length() > 1,
            rx.select(
                s.metric_choices, value=s.metric, on_change=CompareState.pick_metric, id="compare-metric"
            ),
        ),
        rx.cond(s.selected.length() > 0, overlay_chart(s.data, s.series)),
        rx.cond(s.selected.length() > 1, _diff_table()),
        on_mount=CompareState.load,
    )
