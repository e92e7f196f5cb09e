"""The pages of the web app: ``PAGES`` lists (route, component function, title) for the app module."""

from __future__ import annotations

from collections.abc import Callable

import reflex as rx

from ui_app.pages.chat import chat_page
from ui_app.pages.compare import compare_page
from ui_app.pages.export import export_page
from ui_app.pages.new_run import new_run_page
from ui_app.pages.not_found import not_found_page
from ui_app.pages.run_detail import run_detail_wrapper
from ui_app.pages.runs import runs_page

PAGES: list[tuple[str, Callable[[], rx.Component], str]] = [
    ("/", runs_page, "Runs · Backpropagate"),
    ("/new", new_run_page, "New run · Backpropagate"),
    ("/runs", runs_page, "Runs · Backpropagate"),
    ("/runs/[run_id]", run_detail_wrapper, "Run · Backpropagate"),
    ("/compare", compare_page, "Compare · Backpropagate"),
    ("/export", export_page, "Export · Backpropagate"),
    ("/chat", chat_page, "Chat · Backpropagate"),
    ("404", not_found_page, "Page not found · Backpropagate"),
]

__all__ = ["PAGES"]
