"""Structured logging: one line per record, bound to a run id when there is one.

``get_logger(__name__, run_id=...)`` returns a logger adapter whose records carry ``run_id``;
``setup_logging()`` installs one handler (text or JSON lines, to stderr or a file).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("backpropagate_run_id", default=None)


def bind_run_id(run_id: str | None) -> None:
    """Stamp every later record of this context (a worker: the whole process) with ``run_id``."""
    _run_id.set(run_id)


class RunIdFilter(logging.Filter):
    """Adds the bound run id to records that do not carry one already."""

    def filter(self, record: logging.LogRecord) -> bool:
        run_id = _run_id.get()
        bound = dict(getattr(record, "bound", {}) or {})
        if run_id is not None and bound.get("run_id") is None:
            bound = {"run_id": run_id, **bound}
        record.bound = bound
        return True


class RunLogger(logging.LoggerAdapter):
    """A logger whose every record is stamped with ``run_id`` (and any other bound fields)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.pop("extra", {}) or {})
        kwargs["extra"] = {"bound": extra}
        return msg, kwargs

    def bind(self, **fields: Any) -> RunLogger:
        return RunLogger(self.logger, {**(self.extra or {}), **fields})


def get_logger(name: str, **bound: Any) -> RunLogger:
    return RunLogger(logging.getLogger(name), bound)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        bound = getattr(record, "bound", {}) or {}
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = "".join(f" {k}={v}" for k, v in bound.items() if v is not None)
        line = f"{stamp} {record.levelname:<7} {record.name}{fields}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "bound", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(
    level: str = "INFO", json_lines: bool = False, stream: TextIO | None = None, file: Path | None = None
) -> None:
    """Install one handler on the package's root logger (idempotent)."""
    root = logging.getLogger("backpropagate")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler = (
        logging.FileHandler(file) if file else logging.StreamHandler(stream or sys.stderr)
    )
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(RunIdFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = True  # pytest and embedding apps still see the records


def configure_from_settings(process: str | None = None, run_id: str | None = None) -> None:
    """Configure this process's logging from Settings (BACKPROPAGATE_LOG_LEVEL, _LOG_JSON).

    Called once at every entry point (CLI, server, worker); ``run_id`` binds every line to a run.
    A ``process`` name logs one "started" line (long-lived processes; the CLI passes none).
    An invalid level falls back to INFO with a warning rather than stopping the process.
    """
    from backpropagate.settings import get_settings

    settings = get_settings()
    level = settings.log_level.upper()
    valid = level in logging.getLevelNamesMapping()
    bind_run_id(run_id)
    setup_logging(level if valid else "INFO", json_lines=settings.log_json)
    log = get_logger("backpropagate.logs")
    if not valid:
        log.warning("unknown BACKPROPAGATE_LOG_LEVEL %r; using INFO", settings.log_level)
    log.debug("logging configured: level=%s json=%s", level, settings.log_json)
    if process:
        log.info("%s started (pid %d)", process, os.getpid())
