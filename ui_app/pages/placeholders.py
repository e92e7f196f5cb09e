"""The Chat page: it says plainly that chatting in the web app is not there yet and what works instead."""

from __future__ import annotations

import reflex as rx

from ui_app.components.layout import page


def chat_page() -> rx.Component:
    return page(
        "Chat",
        rx.callout(
            "Chatting with a trained model in the web app is not available yet. Nothing is sent from this page.",
            icon="info",
            color_scheme="amber",
            id="chat-missing",
        ),
        rx.text(
            "Export the run on the Export page, then chat with it in a terminal with `backprop chat RUN_ID`"
            " or serve it with `backprop serve RUN_ID`.",
            margin_top="1em",
        ),
    )
