"""RunControl: how the outside world steers a training loop between steps.

The loop checks it at step boundaries only, so a step is never cut in half: a stop request
(SIGTERM, the user, an over-temperature emergency) makes the loop checkpoint and return; a pause
(temperature guard, user) blocks the loop until resumed. Thread-safe; signal handlers may call it.
"""

from __future__ import annotations

import threading
from typing import Literal

StopReason = Literal["user", "signal", "temperature"]
PauseReason = Literal["temperature", "user"]


class RunControl:
    def __init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self.stop_reason: StopReason | None = None
        self.pause_reason: PauseReason | None = None

    # Stopping -----------------------------------------------------------------
    def request_stop(self, reason: StopReason = "user") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()
        self._running.set()  # a paused loop must wake up to notice the stop

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # Pausing ------------------------------------------------------------------
    def pause(self, reason: PauseReason) -> None:
        self.pause_reason = reason
        self._running.clear()

    def resume(self) -> None:
        self.pause_reason = None
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self, poll_s: float = 0.5) -> None:
        """Block while paused; return at once when running or when a stop was requested."""
        while not self._running.wait(poll_s):
            if self._stop.is_set():
                return
