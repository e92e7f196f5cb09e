"""Run ids: unique and time-sortable (``YYYYMMDD-HHMMSS-`` UTC, then 16 hex digits: 64 random bits).

Every door that starts a run (server, ``backprop train``, the Python API) takes its folder from
:func:`create_run_dir`, which creates it exclusively: two runs never share a folder.
"""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

# Older runs have 4 or 6 random hex digits; they keep working.
RUN_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4,16}$")
RANDOM_HEX = 16
_ATTEMPTS = 100


def new_run_id(now: float | None = None) -> str:
    """A new run id; sorting ids as strings sorts runs by creation time (to the second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(RANDOM_HEX // 2)}"


def is_run_id(text: str) -> bool:
    """Whether ``text`` has the shape of a run id (used to refuse path tricks in ids)."""
    return bool(RUN_ID_PATTERN.match(text))


def create_run_dir(runs_dir: Path) -> Path:
    """Create the folder of a new run under ``runs_dir`` and return it (its name is the run id).

    The folder is created exclusively; on the (unlikely) clash with an existing one, a new id
    is drawn, so a new run never writes into another run's folder.
    """
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(_ATTEMPTS):
        run_dir = runs_dir / new_run_id()
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir
    raise FileExistsError(f"no free run id under {runs_dir} after {_ATTEMPTS} attempts")
