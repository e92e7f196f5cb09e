"""Structured logging: one line per record, bound to a run id when there is one.

``get_logger(__name__, run_id=...)`` returns a logger adapter whose records carry ``run_id``;
``setup_logging()`` installs one handler (text or JSON lines, to stderr or a file).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO


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
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
