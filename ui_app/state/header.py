"""Who is signed in and in which mode, for the header; read from the guard's /api/auth/me."""

from __future__ import annotations

from typing import Any

import reflex as rx

MODE_LABELS = {"local": "Local", "basic": "Basic", "shared": "Shared", "network": "Network"}


class HeaderState(rx.State):
    """The header's user and mode badge."""

    user: str = ""
    mode: str = ""

    @rx.event
    def load_me(self) -> rx.event.EventSpec:
        # The guard answers for the browser's own session, so the browser asks it directly.
        return rx.call_script(
            "fetch('/api/auth/me', {credentials: 'same-origin'})"
            ".then(r => r.ok ? r.json() : {}).catch(() => ({}))",
            callback=HeaderState.set_me,
        )

    @rx.event
    def set_me(self, me: Any) -> None:
        if isinstance(me, dict):
            self.user = str(me.get("user") or "")
            self.mode = MODE_LABELS.get(str(me.get("mode") or ""), str(me.get("mode") or ""))

    @rx.event
    def logout(self) -> rx.event.EventSpec:
        return rx.call_script(
            "fetch('/api/auth/logout', {method: 'POST', credentials: 'same-origin'})"
            ".finally(() => { window.location.href = '/login'; })"
        )
