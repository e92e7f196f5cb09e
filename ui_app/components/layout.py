"""The page shell: header with navigation, mode badge, user, logout and the light/dark toggle."""

from __future__ import annotations

import reflex as rx

from ui_app.state.header import HeaderState

NAV = [("Runs", "/"), ("New run", "/new"), ("Compare", "/compare"), ("Export", "/export"), ("Chat", "/chat")]


def nav_link(label: str, href: str) -> rx.Component:
    return rx.link(label, href=href, size="3", weight="medium", underline="hover")


def header() -> rx.Component:
    return rx.flex(
        rx.link(
            rx.hstack(
                rx.icon("activity", size=20),
                rx.heading("Backpropagate", size="4"),
                spacing="2",
                margin_right="1em",
            ),
            href="/",
            underline="none",
            aria_label="Backpropagate home",
        ),
        rx.flex(*[nav_link(label, href) for label, href in NAV], spacing="4", wrap="wrap", as_="nav"),
        rx.spacer(),
        rx.hstack(
            rx.cond(
                HeaderState.mode != "",
                rx.badge(HeaderState.mode, variant="soft", color_scheme="indigo", id="mode-badge"),
            ),
            rx.cond(HeaderState.user != "", rx.text(HeaderState.user, size="2", id="user-name")),
            rx.color_mode.button(size="2", variant="ghost", aria_label="Toggle light and dark theme"),
            rx.button("Log out", size="1", variant="outline", on_click=HeaderState.logout, id="logout"),
            spacing="3",
            align="center",
        ),
        as_="header",
        align="center",
        wrap="wrap",
        gap="4",
        padding_x="1.5em",
        padding_y="0.75em",
        border_bottom="1px solid var(--gray-a5)",
        width="100%",
    )


def page(title: str, *children: rx.Component, on_mount: object = None) -> rx.Component:
    """A page: the header, a heading, then the content in a responsive column."""
    mounts = [HeaderState.load_me] + ([on_mount] if on_mount is not None else [])
    return rx.box(
        header(),
        rx.box(
            rx.heading(title, size="6", margin_bottom="0.75em", as_="h1"),
            *children,
            as_="main",
            padding=["0.75em", "1em", "1.5em"],
            max_width="1200px",
            margin_x="auto",
            width="100%",
        ),
        on_mount=mounts,
        min_height="100vh",
    )
