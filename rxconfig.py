"""Lets `reflex` commands run in the checkout; the real configuration ships in ui_app/rxconfig.py."""

from ui_app.rxconfig import config

__all__ = ["config"]
