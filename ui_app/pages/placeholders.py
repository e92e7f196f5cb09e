"""Export and Chat pages: they say plainly what the web app cannot do yet and what works instead."""

from __future__ import annotations

import reflex as rx

from ui_app.components.layout import page


def export_page() -> rx.Component:
    return page(
        "Export",
        rx.callout(
            "Exporting from the web app is not available yet. No export happens on this page.",
            icon="info",
            color_scheme="amber",
            id="export-missing",
        ),
        rx.text("Export a finished run from the command line instead:", margin_top="1em"),
        rx.code_block("backprop export RUN_ID --format gguf --quantization q4_k_m", language="bash"),
    )


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
