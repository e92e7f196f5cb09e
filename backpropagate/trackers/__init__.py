"""Experiment trackers, fed from a run's event stream (no training code knows about them).

``open_trackers(config, run_dir)`` returns one sink per name in ``config.report_to``; the process
that writes the run's events (the worker, or `backprop train` / ``Trainer`` in the foreground)
passes every stamped event to ``Trackers.on_event`` and closes them at the end. A tracker that
fails while logging is reported once as a warning and dropped: it never stops training.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.events import EventBase
from backpropagate.logs import get_logger

log = get_logger(__name__)

# name -> (the module it needs, the install command that brings it)
REQUIREMENTS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow-skinny"),
    "trackio": ("trackio", "pip install trackio"),
}


class Sink(Protocol):
    def on_event(self, event: EventBase) -> None: ...

    def close(self) -> None: ...


def check_trackers(names: list[str]) -> None:
    """DEP_TRACKER_MISSING naming the install command, before any model is loaded."""
    for name in names:
        module, command = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise BackpropError(
                ErrorCode.DEP_TRACKER_MISSING,
                f"report_to names {name!r}, but the {module!r} package is not installed.",
                hint=f"Install it with `{command}`, or remove {name!r} from report_to.",
            )


class Trackers:
    """The run's sinks; events go to each until it fails once."""

    def __init__(self, sinks: dict[str, Sink]) -> None:
        self.sinks = sinks

    def on_event(self, event: EventBase) -> None:
        for name, sink in list(self.sinks.items()):
            try:
                sink.on_event(event)
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
                log.warning("tracker %s failed and is turned off for this run: %s", name, exc)
                self.sinks.pop(name, None)

    def close(self) -> None:
        for name, sink in self.sinks.items():
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("tracker %s did not close cleanly: %s", name, exc)


def open_trackers(config: Any, run_dir: Path) -> Trackers:
    """The sinks named in ``config.report_to`` (DEP_TRACKER_MISSING first if one is not installed)."""
    names = list(getattr(config, "report_to", None) or [])
    check_trackers(names)
    sinks: dict[str, Sink] = {}
    # Each sink module imports its tracker's package only when the sink opens.
    for name in names:
        if name == "tensorboard":
            from backpropagate.trackers.tensorboard import TensorBoardSink

            sinks[name] = TensorBoardSink(Path(run_dir) / "tensorboard")
        elif name == "wandb":
            from backpropagate.trackers.wandb import WandbSink

            sinks[name] = WandbSink(Path(run_dir))
        elif name == "mlflow":
            from backpropagate.trackers.mlflow import MlflowSink

            sinks[name] = MlflowSink(Path(run_dir))
        elif name == "trackio":
            from backpropagate.trackers.trackio import TrackioSink

            sinks[name] = TrackioSink(Path(run_dir))
    return Trackers(sinks)
