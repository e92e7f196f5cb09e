"""Run status as a coloured badge and a progress bar."""

from __future__ import annotations

import reflex as rx

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
    return rx.badge(
        status,
        color_scheme=rx.match(status, *[(k, v) for k, v in STATUS_COLORS.items()], "gray"),
        variant="soft",
        class_name="run-status",
    )


def progress(value: rx.Var[int] | int) -> rx.Component:
    return rx.progress(value=value, max=100, width="100%", min_width="4em", aria_label="Progress")
