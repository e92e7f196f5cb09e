"""The runs page: every run with its live status."""

from __future__ import annotations

import reflex as rx


def runs_page() -> rx.Component:
    return rx.container(rx.heading("Runs", size="6"), rx.text("No runs yet."))
