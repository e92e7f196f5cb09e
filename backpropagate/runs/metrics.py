"""Metric series from a run's log at full resolution: the one reducer (runs/fold.py) over the log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backpropagate.events import read_events
from backpropagate.runs.fold import STEP_FIELDS, RunFold

__all__ = ["STEP_FIELDS", "read_metrics"]


def read_metrics(events_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Every ``step`` and ``eval`` point of a run, in order (a resumed run's repeated steps replaced)."""
    fold = RunFold().apply_all(read_events(events_path))
    return {"steps": fold.steps, "eval": fold.evals}
