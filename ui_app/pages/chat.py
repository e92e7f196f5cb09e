"""The Chat page: talk to a run's GGUF export, optionally beside a second export answering the same chat.

The second column can be the run's base model: one button exports it (same quantization) and picks it.
Replies are rated into data sets under the columns: the better of two (DPO pairs) or one up or down (KTO).
"""

from __future__ import annotations

import reflex as rx

from ui_app.components.layout import page
from ui_app.state.chat import ChatState


def _bubble(m: rx.Var) -> rx.Component:
    mine = m["role"] == "user"
    return rx.box(
        rx.text(m["content"], white_space="pre-wrap", size="2"),
        rx.cond(m["error"], rx.text(m["error"], color_scheme="red", size="1")),
        class_name=rx.cond(mine, "chat-bubble chat-user", "chat-bubble chat-assistant"),
        background=rx.cond(mine, "var(--accent-4)", "var(--gray-3)"),
        align_self=rx.cond(mine, "flex-end", "flex-start"),
        padding="0.5em 0.75em",
        border_radius="10px",
        max_width="90%",
    )


def _column(messages: rx.Var, picked: rx.Var, items: rx.Var, on_change: object, col: str) -> rx.Component:
    return rx.card(
        rx.select.root(
            rx.select.trigger(placeholder="Pick a GGUF export", id=f"chat-model-{col}", width="100%"),
            rx.select.content(rx.foreach(items, lambda e: rx.select.item(e["label"], value=e["id"]))),
            value=picked,
            on_change=on_change,
        ),
        rx.vstack(
            rx.foreach(messages, _bubble),
            rx.cond(messages.length() == 0, rx.text("No messages yet.", size="2", color_scheme="gray")),
            id=f"chat-log-{col}",
            spacing="2",
            margin_top="0.75em",
            width="100%",
            align_items="stretch",
        ),
        _rating_controls(col),
        width="100%",
    )


def _rating_controls(col: str) -> rx.Component:
    """Under a column's latest reply: mark it the better one (two columns), or rate it up or down."""
    s = ChatState
    ready = s.left_ready if col == "left" else s.right_ready
    rated = s.rated_left if col == "left" else s.rated_right
    return rx.cond(
        ready,
        rx.hstack(
            rx.cond(
                s.left_ready & s.right_ready,
                rx.button(
                    rx.icon("check", size=14),
                    "This one is better",
                    on_click=ChatState.prefer(col),
                    disabled=s.rated_pair,
                    size="1",
                    variant="soft",
                    id=f"chat-better-{col}",
                ),
            ),
            rx.icon_button(
                rx.icon("thumbs_up", size=14),
                on_click=ChatState.rate(col, True),
                disabled=rated,
                size="1",
                variant="soft",
                color_scheme="green",
                aria_label="Good reply",
                id=f"chat-up-{col}",
            ),
            rx.icon_button(
                rx.icon("thumbs_down", size=14),
                on_click=ChatState.rate(col, False),
                disabled=rated,
                size="1",
                variant="soft",
                color_scheme="red",
                aria_label="Bad reply",
                id=f"chat-down-{col}",
            ),
            spacing="2",
            margin_top="0.75em",
            align="center",
        ),
    )


def _ratings_panel() -> rx.Component:
    s = ChatState
    return rx.vstack(
        rx.hstack(
            rx.text(
                "Saved ratings: ",
                rx.text.strong(s.pairs_count),
                " pairs, ",
                rx.text.strong(s.kto_count),
                " rated replies",
                size="2",
                id="chat-ratings-count",
            ),
            rx.cond(
                s.pairs_count > 0,
                rx.link(
                    "Train on these ratings (DPO)",
                    href="/new?data=" + s.pairs_id + "&objective=dpo",
                    id="chat-train-dpo",
                    size="2",
                ),
            ),
            rx.cond(
                s.kto_count > 0,
                rx.link(
                    "Train on these ratings (KTO)",
                    href="/new?data=" + s.kto_id + "&objective=kto",
                    id="chat-train-kto",
                    size="2",
                ),
            ),
            spacing="4",
            align="center",
            wrap="wrap",
        ),
        rx.text(
            "Mark the better of two replies to save a preference pair, or rate one up or down for KTO; "
            "they are saved as the chat-ratings data sets in your uploads.",
            size="1",
            color_scheme="gray",
        ),
        rx.cond(
            s.rate_error != "",
            rx.callout(s.rate_error, color_scheme="red", icon="triangle_alert", id="chat-rate-error"),
        ),
        spacing="1",
        margin_top="0.75em",
        width="100%",
        id="chat-ratings",
    )


def _base_model_control() -> rx.Component:
    s = ChatState
    return rx.flex(
        rx.flex(
            rx.button(
                rx.icon("git_compare", size=16),
                "Compare with the base model",
                on_click=ChatState.make_base,
                loading=s.base_status == "running",
                disabled=s.left_id == "",
                variant="soft",
                id="chat-base-export",
            ),
            rx.text(
                "Exports the model the left run started from, without its adapter, in the same "
                "quantization (once; later it is reused), and answers with it on the right.",
                size="1",
                color_scheme="gray",
            ),
            gap="3",
            align="center",
            wrap="wrap",
        ),
        rx.cond(
            s.base_status == "running",
            rx.box(
                rx.text("Exporting the base model… ", s.base_stage, " (", s.base_percent, " %)", size="1"),
                rx.progress(value=s.base_percent, max=100, width="100%"),
                id="chat-base-progress",
                width="100%",
            ),
        ),
        rx.cond(
            s.base_error != "",
            rx.callout(s.base_error, color_scheme="red", icon="triangle_alert", id="chat-base-error"),
        ),
        direction="column",
        gap="2",
        margin_top="0.75em",
        width="100%",
    )


def chat_page() -> rx.Component:
    s = ChatState
    return page(
        "Chat",
        rx.cond(
            s.extra_command != "",
            rx.callout.root(
                rx.callout.icon(rx.icon("info")),
                rx.callout.text(
                    "Chatting runs the GGUF in llama.cpp's server, from llama-cpp-python (the export "
                    "extra), which this install does not have. Add it, then restart the app:"
                ),
                rx.code(
                    s.extra_command, id="chat-extra-command", white_space="pre-wrap", word_break="break-all"
                ),
                color_scheme="amber",
                id="chat-extra-missing",
                margin_bottom="1em",
            ),
        ),
        rx.cond(
            s.asked_run != "",
            rx.callout(
                rx.text(
                    s.asked_run_name,
                    " has no GGUF export yet: chatting needs one. ",
                    rx.link("Export this run", href="/export?run=" + s.asked_run, id="chat-run-export-link"),
                    " with format gguf, then come back.",
                ),
                icon="info",
                id="chat-run-no-export",
                margin_bottom="1em",
            ),
        ),
        rx.cond(
            s.exports.length() > 0,
            rx.box(
                rx.grid(
                    _column(s.left, s.left_id, s.exports, ChatState.set_left, "left"),
                    rx.cond(
                        s.two,
                        _column(s.right, s.right_id, s.right_choices, ChatState.set_right, "right"),
                        rx.card(
                            rx.text("Compare with a second export (for example the base model's):", size="2"),
                            rx.select.root(
                                rx.select.trigger(placeholder="No second model", id="chat-model-right"),
                                rx.select.content(
                                    rx.foreach(
                                        s.right_choices, lambda e: rx.select.item(e["label"], value=e["id"])
                                    )
                                ),
                                value=s.right_id,
                                on_change=ChatState.set_right,
                            ),
                            width="100%",
                        ),
                    ),
                    columns=rx.breakpoints(initial="1", md="2"),
                    gap="3",
                    width="100%",
                ),
                _base_model_control(),
                _ratings_panel(),
                rx.form(
                    rx.hstack(
                        rx.text_area(
                            value=s.draft,
                            on_change=ChatState.set_draft,
                            placeholder="Type a message",
                            id="chat-input",
                            aria_label="Message",
                            width="100%",
                            rows="2",
                            enter_key_submit=True,  # Enter sends, Shift+Enter starts a new line
                        ),
                        rx.vstack(
                            rx.button("Send", type="submit", loading=s.sending, id="chat-send"),
                            rx.button(
                                "Clear",
                                type="button",
                                variant="soft",
                                on_click=ChatState.clear,
                                id="chat-clear",
                            ),
                        ),
                        width="100%",
                        margin_top="1em",
                    ),
                    on_submit=lambda _: ChatState.send,
                    reset_on_submit=False,
                ),
                width="100%",
            ),
            rx.cond(
                s.loaded,
                rx.callout(
                    rx.text(
                        "No GGUF export yet: chatting needs a run exported to GGUF. ",
                        rx.link("Export a finished run", href="/export", id="chat-export-link"),
                        " with format gguf, then come back.",
                    ),
                    icon="info",
                    id="chat-no-exports",
                ),
                rx.text("Loading exports…", size="2"),
            ),
        ),
        rx.cond(
            s.error != "", rx.callout(s.error, color_scheme="red", icon="triangle_alert", id="chat-error")
        ),
        on_mount=ChatState.load,
    )
