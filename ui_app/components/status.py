"""Run status as a coloured badge and a progress bar."""

from __future__ import annotations

import reflex as rx

from ui_app.state.runview import STATUS_LABELS

STATUS_COLORS = {
    "queued": "gray",
    "running": "blue",
    "paused": "amber",
    "completed": "green",
    "failed": "red",
    "cancelled": "orange",
    "interrupted": "orange",
}


def status_badge(status: rx.Var[str] | str) -> rx.Component:
    """The status's human label in its colour (STATUS_COLORS: the one place for them)."""
    label = (
        rx.match(status, *STATUS_LABELS.items(), status)
        if isinstance(status, rx.Var)
        else STATUS_LABELS.get(status, status)
    )
    return rx.badge(
        label,
        color_scheme=rx.match(status, *[(k, v) for k, v in STATUS_COLORS.items()], "gray"),
        variant="soft",
        class_name="run-status",
    )


def progress(value: rx.Var[int] | int) -> rx.Component:
    return rx.progress(value=value, max=100, width="100%", min_width="4em", aria_label="Progress")
