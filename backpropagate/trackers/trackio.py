"""Trackio: one Trackio run per Backpropagate run, named by the run id (a resume continues it).

Trackio's own variables apply: ``TRACKIO_DIR`` (its local database; default under ``HF_HOME``,
shared by all runs so ``trackio show`` lists them together), ``TRACKIO_PROJECT`` here (default
``backpropagate``), ``TRACKIO_SPACE_ID`` / ``TRACKIO_SERVER_URL`` to log to a Space or a server.
GPU telemetry goes in as Trackio system metrics (by time), not on the step axis.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from backpropagate.events import EventBase
from backpropagate.trackers.metrics import final_metrics, scalars_of


class TrackioSink:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.run: Any = None
        self.ended = False

    def _open(self, run_id: str, config: dict[str, Any] | None) -> Any:
        import trackio

        # Trackio prints its banner to stdout, which is the worker's log and `--json`'s output.
        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(
                project=os.environ.get("TRACKIO_PROJECT") or "backpropagate",
                name=run_id or None,
                config=config or None,
                resume="allow",
                embed=False,
                auto_log_gpu=False,  # the run's own gpu events are logged instead
                auto_log_cpu=False,
            )
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
            if values and group == "gpu":
                run.log_system(values)
            elif values:
                run.log(values, step=step)
        elif kind == "completed":
            final = {f"final/{k}": v for k, v in final_metrics(event).items()}
            if final:
                run.log(final, step=int(getattr(event, "step", 0) or 0))
            self._finish()
        elif kind in ("failed", "cancelled"):
            self._finish()

    def _finish(self) -> None:
        if self.run is not None:
            import trackio

            with contextlib.redirect_stdout(sys.stderr):
                trackio.finish()  # flushes the queued logs and clears trackio's current run
            self.run = None
        self.ended = True

    def close(self) -> None:
        self._finish()
