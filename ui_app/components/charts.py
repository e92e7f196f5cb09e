"""Line charts of run metrics (recharts); the data handed in is already bounded in size."""

from __future__ import annotations

import reflex as rx


def loss_chart(data: rx.Var, height: int = 300, chart_id: str = "loss-chart") -> rx.Component:
    """Train loss and eval loss against the step."""
    return rx.box(
        rx.recharts.line_chart(
            rx.recharts.cartesian_grid(stroke_dasharray="3 3", stroke="var(--gray-a5)"),
            rx.recharts.line(
                data_key="loss", name="train loss", stroke="var(--indigo-9)", dot=False,
                is_animation_active=False, type_="linear",
            ),
            rx.recharts.line(
                data_key="eval_loss", name="eval loss", stroke="var(--orange-9)", connect_nulls=True,
                is_animation_active=False, type_="linear",
            ),
            rx.recharts.x_axis(data_key="step", type_="number", domain=["dataMin", "dataMax"], allow_decimals=False),
            rx.recharts.y_axis(domain=["auto", "auto"], width=50),
            rx.recharts.graphing_tooltip(),
            rx.recharts.legend(),
            data=data,
            height=height,
            width="100%",
        ),
        id=chart_id,
        width="100%",
    )  # fmt: skip


def metric_chart(data: rx.Var, key: str, label: str, color: str, height: int = 160) -> rx.Component:
    """A small chart of one per-step metric (lr, grad norm, tokens/s)."""
    return rx.box(
        rx.text(label, size="2", weight="medium"),
        rx.recharts.line_chart(
            rx.recharts.line(data_key=key, stroke=color, dot=False, is_animation_active=False),
            rx.recharts.x_axis(data_key="step", type_="number", domain=["dataMin", "dataMax"], hide=True),
            rx.recharts.y_axis(domain=["auto", "auto"], width=60),
            rx.recharts.graphing_tooltip(),
            data=data,
            height=height,
            width="100%",
        ),
        width="100%",
    )


def overlay_chart(data: rx.Var, series: rx.Var, height: int = 360) -> rx.Component:
    """Loss curves of several runs on one step axis; ``series`` lists {key, color, dash, name}."""
    return rx.box(
        rx.recharts.line_chart(
            rx.recharts.cartesian_grid(stroke_dasharray="3 3", stroke="var(--gray-a5)"),
            rx.foreach(
                series,
                lambda s: rx.recharts.line(
                    data_key=s["key"], name=s["name"], stroke=s["color"], stroke_dasharray=s["dash"],
                    stroke_width=2, dot=False, connect_nulls=True, is_animation_active=False,
                ),
            ),
            rx.recharts.x_axis(data_key="step", type_="number", domain=["dataMin", "dataMax"], allow_decimals=False),
            rx.recharts.y_axis(domain=["auto", "auto"], width=50),
            rx.recharts.graphing_tooltip(),
            rx.recharts.legend(),
            data=data,
            height=height,
            width="100%",
        ),
        id="compare-chart",
        width="100%",
    )  # fmt: skip
