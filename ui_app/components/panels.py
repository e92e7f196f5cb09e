"""Panels of the run page: stat tiles, GPU cards, the event timeline, the log tail."""

from __future__ import annotations

import reflex as rx

LEVEL_COLORS = {"ok": "green", "warm": "amber", "critical": "red"}
KIND_COLORS = {"info": "gray", "warning": "amber", "error": "red", "success": "green"}


def stat(label: str, value: rx.Var | str, stat_id: str = "") -> rx.Component:
    return rx.card(
        rx.text(label, size="1", color_scheme="gray"),
        rx.text(value, size="5", weight="bold", id=stat_id or None),
        min_width="8em",
    )


def gpu_card(gpu: rx.Var) -> rx.Component:
    return rx.card(
        rx.hstack(
            rx.text(gpu["name"], weight="bold"),
            rx.spacer(),
            rx.badge(
                gpu["temperature"],
                color_scheme=rx.match(gpu["level"], *LEVEL_COLORS.items(), "gray"),
                aria_label="Temperature",
            ),
        ),
        rx.text("VRAM ", gpu["vram"], size="2"),
        rx.progress(value=gpu["vram_pct"].to(int), max=100, aria_label="VRAM used"),
        rx.hstack(
            rx.text("Utilization ", gpu["util"], size="2"),
            rx.text("Power ", gpu["power"], size="2"),
            spacing="4",
        ),
        width="100%",
        max_width="22em",
    )


def gpu_panel(gpus: rx.Var, device: rx.Var) -> rx.Component:
    return rx.box(
        rx.heading("GPU", size="3", margin_bottom="0.5em", as_="h2"),
        rx.cond(
            gpus.length() > 0,
            rx.flex(rx.foreach(gpus, gpu_card), gap="3", wrap="wrap"),
            rx.text(
                rx.cond(device != "", "No GPU telemetry — training on " + device.to(str), "No GPU"),
                color_scheme="gray",
                id="no-gpu",
            ),
        ),
    )


def timeline_row(entry: rx.Var) -> rx.Component:
    return rx.hstack(
        rx.badge(entry["kind"], color_scheme=rx.match(entry["kind"], *KIND_COLORS.items(), "gray")),
        rx.text(entry["text"], size="2"),
        rx.cond(
            entry["code"] != "",
            rx.link(entry["code"], href=entry["url"], is_external=True, size="2"),
        ),
        spacing="2",
        align="start",
        class_name="timeline-entry",
    )


def timeline(entries: rx.Var) -> rx.Component:
    return rx.box(
        rx.heading("Timeline", size="3", margin_bottom="0.5em", as_="h2"),
        rx.vstack(rx.foreach(entries, timeline_row), spacing="1", id="timeline"),
    )


def log_tail(text: rx.Var) -> rx.Component:
    return rx.box(
        rx.heading("Log", size="3", margin_bottom="0.5em", as_="h2"),
        rx.el.pre(
            text,
            id="log-tail",
            style={"max_height": "18em", "overflow": "auto", "white_space": "pre-wrap", "font_size": "12px"},
        ),
    )
