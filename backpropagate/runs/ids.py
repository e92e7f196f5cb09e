"""Run ids for the server: the one generator of :mod:`backpropagate.training.run_ids`."""

from __future__ import annotations

from backpropagate.training.run_ids import create_run_dir, is_run_id, new_run_id

__all__ = ["create_run_dir", "is_run_id", "new_run_id"]
