"""The pages of the web app: ``PAGES`` lists (route, component function, title) for the app module."""

from __future__ import annotations

from collections.abc import Callable

import reflex as rx

from ui_app.pages.runs import runs_page

PAGES: list[tuple[str, Callable[[], rx.Component], str]] = [
    ("/", runs_page, "Runs · Backpropagate"),
]

__all__ = ["PAGES"]
