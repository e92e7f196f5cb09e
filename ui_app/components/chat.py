"""Chat bubbles: a data set row (or a conversation) shown as turns of a chat."""

from __future__ import annotations

import reflex as rx


def bubble(turn: rx.Var) -> rx.Component:
    is_user = (turn["role"] == "user") | (turn["role"] == "system")
    return rx.flex(
        rx.box(
            rx.text(turn["role"], size="1", color_scheme="gray"),
            rx.text(turn["content"], size="2", white_space="pre-wrap"),
            background=rx.cond(is_user, "var(--gray-a3)", "var(--indigo-a3)"),
            padding="0.5em 0.75em",
            border_radius="12px",
            max_width="85%",
            class_name="chat-bubble",
        ),
        justify=rx.cond(is_user, "start", "end"),
        width="100%",
    )


def preview_row(row: rx.Var) -> rx.Component:
    return rx.card(
        rx.vstack(rx.foreach(row["turns"].to(list[dict[str, str]]), bubble), spacing="2", width="100%"),
        width="100%",
    )
