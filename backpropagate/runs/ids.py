"""Run ids: sortable by creation time, short enough to type, unique across processes."""

from __future__ import annotations

import secrets
import time


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: the creation time (UTC) and 24 random bits."""
    try:  # the engine's own generator, when present, so `backprop train` and the server agree
        from backpropagate.training.run_ids import new_run_id as engine_new_run_id
    except ImportError:
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
    return engine_new_run_id()
