"""The page for an address the app does not have: says so and offers the way back."""

from __future__ import annotations

import reflex as rx

from ui_app.components.layout import page


def not_found_page() -> rx.Component:
    return page(
        "Page not found",
        rx.card(
            rx.vstack(
                rx.text("There is no page at ", rx.code(rx.State.router.url.path), "."),
                rx.hstack(
                    rx.link(rx.button("All runs"), href="/"),
                    rx.link(rx.button("New run", variant="soft"), href="/new"),
                    spacing="3",
                ),
                spacing="3",
            ),
            id="not-found",
        ),
    )
