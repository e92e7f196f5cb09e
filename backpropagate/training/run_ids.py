"""Run ids: short, unique and time-sortable (``YYYYMMDD-HHMMSS-xxxx``, UTC)."""

from __future__ import annotations

import re
import secrets
import time

RUN_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")


def new_run_id(now: float | None = None) -> str:
    """A new run id; sorting ids as strings sorts runs by creation time (to the second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(2)}"


def is_run_id(text: str) -> bool:
    """Whether ``text`` has the shape of a run id (used to refuse path tricks in ids)."""
    return bool(RUN_ID_PATTERN.match(text))
