"""Weights & Biases: one W&B run per Backpropagate run, its id the run id (a resume continues it).

W&B's own variables apply: ``WANDB_MODE=offline`` writes the run files only (``wandb sync`` uploads
them later), ``WANDB_PROJECT`` (default ``backpropagate``), ``WANDB_ENTITY``, ``WANDB_API_KEY``,
``WANDB_DIR`` (default: the run folder, so files land in ``RUN_DIR/wandb/``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from backpropagate.events import EventBase
from backpropagate.trackers.metrics import final_metrics, scalars_of

# Each group plots against its own x-axis: optimizer steps for train and eval, seq for GPU samples.
STEP_KEYS = {"train": "train/step", "eval": "eval/step", "gpu": "gpu/seq"}


class WandbSink:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.run: Any = None
        self.ended = False

    def _open(self, run_id: str, config: dict[str, Any] | None) -> Any:
        import wandb

        kwargs: dict[str, Any] = {
            "project": os.environ.get("WANDB_PROJECT") or "backpropagate",
            "name": run_id or None,
            "config": config or None,
            "resume": "allow",
            # The worker's stdout is its log and `backprop train --json` prints JSON there:
            # W&B must neither wrap the streams nor print banners.
            "settings": wandb.Settings(console="off", silent=True, disable_git=True),
        }
        if run_id and not os.environ.get("WANDB_RUN_ID"):
            kwargs["id"] = run_id
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(self.run_dir)
        self.run = wandb.init(**kwargs)
        for group, key in STEP_KEYS.items():
            self.run.define_metric(key, hidden=True)
            self.run.define_metric(f"{group}/*" if group != "gpu" else "gpu*", step_metric=key)
        return self.run

    def on_event(self, event: EventBase) -> None:
        kind = event.type  # type: ignore[attr-defined]
        if self.ended:
            return
        if kind == "run_started":
            if self.run is None:
                self._open(event.run_id, event.config)  # type: ignore[attr-defined]
            return
        run = self.run or self._open(event.run_id, None)
        found = scalars_of(event)
        if found is not None:
            group, step, values = found
            if values:
                run.log({STEP_KEYS[group]: step, **values})
        elif kind == "completed":
            run.summary.update({f"final/{k}": v for k, v in final_metrics(event).items()})
            self._finish(0)
        elif kind in ("failed", "cancelled"):
            self._finish(1)

    def _finish(self, exit_code: int) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
        self.ended = True

    def close(self) -> None:
        self._finish(0)
