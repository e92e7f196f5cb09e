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
            "Export the run to GGUF and serve it with llama.cpp's OpenAI-compatible server to chat with it.",
            margin_top="1em",
        ),
    )
