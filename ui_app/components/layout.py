"""The page shell: header with navigation, mode badge, user, logout and the light/dark toggle."""

from __future__ import annotations

import reflex as rx

from ui_app.state.header import HeaderState

NAV = [("Runs", "/"), ("New run", "/new"), ("Compare", "/compare"), ("Export", "/export"), ("Chat", "/chat")]


# Read by screen readers, not drawn: says what the badge and the name next to it are.
SR_ONLY = {
    "position": "absolute",
    "width": "1px",
    "height": "1px",
    "overflow": "hidden",
    "clip": "rect(0 0 0 0)",
    "white_space": "nowrap",
}


def nav_link(label: str, href: str) -> rx.Component:
    return rx.link(label, href=href, size="3", weight="medium", underline="hover")


def signed_in() -> rx.Component:
    """The mode badge and the user name, as text (the badge's colour adds nothing they need)."""
    return rx.hstack(
        rx.cond(
            HeaderState.mode != "",
            rx.fragment(
                rx.el.span("Sign-in mode: ", style=SR_ONLY),
                rx.badge(HeaderState.mode, variant="soft", color_scheme="indigo", id="mode-badge"),
            ),
        ),
        rx.cond(
            HeaderState.user != "",
            rx.fragment(
                rx.el.span("Signed in as ", style=SR_ONLY),
                rx.text(HeaderState.user, size="2", id="user-name", as_="span"),
            ),
        ),
        spacing="3",
        align="center",
        position="relative",
    )


def header() -> rx.Component:
    # Radix's Flex and Box render divs whatever ``as_`` says: landmarks need the HTML elements.
    return rx.el.header(
        rx.flex(
            rx.link(
                rx.hstack(
                    rx.icon("activity", size=20),
                    # not a heading: each page's title is its one h1
                    rx.text("Backpropagate", size="4", weight="bold"),
                    spacing="2",
                    margin_right="1em",
                ),
                href="/",
                underline="none",
                aria_label="Backpropagate home",
            ),
            rx.el.nav(
                rx.flex(*[nav_link(label, href) for label, href in NAV], spacing="4", wrap="wrap"),
                aria_label="Pages",
            ),
            rx.spacer(),
            rx.hstack(
                signed_in(),
                rx.color_mode.button(size="2", variant="ghost", aria_label="Toggle light and dark theme"),
                rx.button("Log out", size="1", variant="outline", on_click=HeaderState.logout, id="logout"),
                spacing="3",
                align="center",
            ),
            align="center",
            wrap="wrap",
            gap="4",
            padding_x="1.5em",
            padding_y="0.75em",
            border_bottom="1px solid var(--gray-a5)",
            width="100%",
        ),
        width="100%",
    )


def page(title: str, *children: rx.Component, on_mount: object = None) -> rx.Component:
    """A page: the header, a heading, then the content in a responsive column."""
    mounts = [HeaderState.load_me] + ([on_mount] if on_mount is not None else [])
    return rx.box(
        header(),
        rx.el.main(
            rx.box(
                rx.heading(title, size="6", margin_bottom="0.75em", as_="h1"),
                *children,
                padding=["0.75em", "1em", "1.5em"],
                max_width="1200px",
                margin_x="auto",
                width="100%",
            ),
            width="100%",
        ),
        on_mount=mounts,
        min_height="100vh",
    )
