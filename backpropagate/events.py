"""The event schema: the only wire format from worker to server to browser.

A worker appends one JSON object per line to ``RUN_DIR/events.jsonl``. Every event has ``v``
(schema version), ``type``, ``run_id``, ``seq`` (1, 2, 3, ... without gaps) and ``ts`` (Unix
seconds). Producers build an event with the payload only; :class:`EventLog` stamps ``run_id``,
``seq`` and ``ts`` as it writes. Documented in docs/events.md (a test keeps it in step).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1


class RunStatus(StrEnum):
    """The one status vocabulary of a run: the store, the API, the CLI and the web app use it."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


S = RunStatus
ACTIVE_STATUSES: frozenset[RunStatus] = frozenset({S.QUEUED, S.RUNNING, S.PAUSED})
RESUMABLE_STATUSES: frozenset[RunStatus] = frozenset({S.CANCELLED, S.FAILED, S.INTERRUPTED})
TERMINAL_STATUSES: frozenset[RunStatus] = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.INTERRUPTED})


class EventBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int = SCHEMA_VERSION
    run_id: str = ""
    seq: int = 0
    ts: float = 0.0


class RunStarted(EventBase):
    """The worker is up and has read its config. `world_size` is the number of processes training
    the run together (torchrun ranks; 1 for a plain run) and `devices` each rank's device, in rank
    order; `device` is rank 0's."""

    type: Literal["run_started"] = "run_started"
    pid: int
    resumed_from_step: int | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    backend: str | None = None
    device: str | None = None
    total_steps: int | None = None
    world_size: int = 1
    devices: list[str] = Field(default_factory=list)


class Status(EventBase):
    """A change of phase: loading model, tokenizing, training, saving, ..."""

    type: Literal["status"] = "status"
    status: RunStatus
    phase: str | None = None
    message: str | None = None


class Step(EventBase):
    """One optimizer step. `loss` is the objective's loss. Preference objectives (dpo, orpo, simpo,
    kto) add the mean implicit rewards of the step's rows: `chosen_reward`, `rejected_reward`,
    `reward_margin` (chosen minus rejected) and `reward_accuracy` (share of pairs whose chosen
    reward is the higher; pairs only). A reward is beta x (policy - reference) log-prob for DPO and
    KTO, beta x the mean token log-prob for SimPO, lambda x that for ORPO. KTO adds `kl`, its
    reference point (the batch's mean log-ratio, at least 0)."""

    type: Literal["step"] = "step"
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    micro_batch: int | None = None
    grad_accum: int | None = None
    # Preference objectives (docs/events.md): mean implicit rewards of the step's rows.
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    kl: float | None = None  # KTO's reference point


class GpuDevice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    name: str | None = None
    temperature_c: float | None = None
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    utilization_pct: float | None = None
    power_w: float | None = None
    slowdown_temp_c: float | None = None
    throttle_reasons: list[str] = Field(default_factory=list)


class Gpu(EventBase):
    """A telemetry sample for each GPU the run uses."""

    type: Literal["gpu"] = "gpu"
    devices: list[GpuDevice]


class Eval(EventBase):
    """Held-out evaluation. SFT reports loss and perplexity; preference objectives report their
    loss and the same reward fields as `step` (no perplexity: their loss is not a likelihood)."""

    type: Literal["eval"] = "eval"
    step: int
    loss: float
    perplexity: float | None = None  # None for preference objectives: their loss is no likelihood
    reward_margin: float | None = None
    reward_accuracy: float | None = None
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    kl: float | None = None


class Checkpoint(EventBase):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str
    bytes: int
    best: bool = False


class Paused(EventBase):
    type: Literal["paused"] = "paused"
    reason: Literal["temperature", "user"]
    step: int | None = None
    temperature_c: float | None = None
    code: str | None = None


class Resumed(EventBase):
    type: Literal["resumed"] = "resumed"
    reason: Literal["temperature", "user"]
    step: int | None = None
    temperature_c: float | None = None


class OomRecovered(EventBase):
    type: Literal["oom_recovered"] = "oom_recovered"
    step: int
    old_micro_batch: int
    new_micro_batch: int
    grad_accum: int
    retries: int = 0


class Warning_(EventBase):
    type: Literal["warning"] = "warning"
    code: str
    message: str
    hint: str | None = None


class Error(EventBase):
    type: Literal["error"] = "error"
    code: str
    message: str
    hint: str | None = None
    retryable: bool = False


class Completed(EventBase):
    type: Literal["completed"] = "completed"
    step: int
    final_loss: float | None = None
    eval_loss: float | None = None
    adapter_path: str | None = None
    runtime_s: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class Failed(EventBase):
    type: Literal["failed"] = "failed"
    code: str
    message: str
    hint: str | None = None
    retryable: bool = False
    step: int | None = None
    exit_code: int | None = None


class Cancelled(EventBase):
    type: Literal["cancelled"] = "cancelled"
    step: int | None = None
    checkpoint: str | None = None


Event = Annotated[
    RunStarted
    | Status
    | Step
    | Gpu
    | Eval
    | Checkpoint
    | Paused
    | Resumed
    | OomRecovered
    | Warning_
    | Error
    | Completed
    | Failed
    | Cancelled,
    Field(discriminator="type"),
]
EVENT_TYPES: tuple[type[EventBase], ...] = (
    RunStarted, Status, Step, Gpu, Eval, Checkpoint, Paused, Resumed,
    OomRecovered, Warning_, Error, Completed, Failed, Cancelled,
)  # fmt: skip
FINAL_TYPES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
# Types whose loss would hurt: fsync them so a crash right after cannot lose them.
DURABLE_TYPES: frozenset[str] = frozenset(
    {"run_started", "status", "checkpoint", "error", "completed", "failed", "cancelled", "paused"}
)

_adapter: TypeAdapter[Any] = TypeAdapter(Event)


def parse_event(data: dict[str, Any] | str | bytes) -> EventBase:
    """Parse one event from a dict or a JSON line."""
    if isinstance(data, (str, bytes)):
        return _adapter.validate_json(data)
    return _adapter.validate_python(data)


_reported_bad_lines: set[tuple[str, int]] = set()


def parse_log_line(line: bytes, path: Path | str, lineno: int) -> EventBase | None:
    """One complete line of a log parsed, or None (with a warning, once) if it is not an event.

    A damaged line never ends a log: readers skip it and carry on with the next one.
    """
    try:
        return parse_event(line)
    except ValueError as exc:  # pydantic's ValidationError and UnicodeDecodeError are ValueErrors
        key = (str(path), lineno)
        if key not in _reported_bad_lines:
            if len(_reported_bad_lines) > 10_000:
                _reported_bad_lines.clear()
            _reported_bad_lines.add(key)
            from backpropagate.logs import get_logger

            get_logger(__name__).warning(
                "skipping malformed line %d of %s: %s", lineno, path, str(exc).splitlines()[0]
            )
        return None


def read_events(path: Path, after: int = 0) -> Iterator[EventBase]:
    """Events of a log with seq > ``after``.

    A torn last line (a crash mid-write) is ignored; a complete line that is not an event is
    skipped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.endswith(b"\n"):
                break  # partially written; the writer will finish or it was lost in a crash
            if not line.strip():
                continue
            event = parse_log_line(line, path, lineno)
            if event is not None and event.seq > after:
                yield event


class EventLog:
    """Append-only writer of ``events.jsonl`` for one run; thread-safe, gapless ``seq``.

    Reopening an existing log continues its numbering, so a resumed run extends its history.
    """

    def __init__(self, path: Path, run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        self._seq = max((e.seq for e in read_events(self.path)), default=0)
        self._fh = self.path.open("ab")

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    @property
    def last_seq(self) -> int:
        return self._seq

    def append(self, event: EventBase) -> EventBase:
        """Stamp ``run_id``, ``seq`` and ``ts`` on ``event``, write it, and return the stamped copy."""
        with self._lock:
            stamped = event.model_copy(
                update={"run_id": self.run_id, "seq": self._seq + 1, "ts": time.time()}
            )
            self._fh.write(stamped.model_dump_json().encode() + b"\n")
            self._fh.flush()
            if stamped.type in DURABLE_TYPES:  # type: ignore[attr-defined]
                os.fsync(self._fh.fileno())
            self._seq += 1
            return stamped

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Wire messages that are not events ------------------------------------------------------------
# The WebSockets send events as above, and these: they have no ``seq`` and are never in a log.


class WireMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Heartbeat(WireMessage):
    """Sent on an idle socket every 15 s (both WebSockets); ignore it."""

    type: Literal["heartbeat"] = "heartbeat"


class RunStatusMessage(WireMessage):
    """`/api/events`: a run changed status or made progress (and, on connect, each active run)."""

    type: Literal["run_status"] = "run_status"
    run_id: str
    status: RunStatus
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    error_code: str | None = None
    ts: float


class RunDeleted(WireMessage):
    """`/api/events`: a run and its folder were deleted."""

    type: Literal["run_deleted"] = "run_deleted"
    run_id: str
    ts: float


WIRE_TYPES: tuple[type[WireMessage], ...] = (Heartbeat, RunStatusMessage, RunDeleted)
# What a WebSocket may send: an event (a refusal is an ``error`` event with seq 0: not from the
# log), or one of the messages above.
Wire = Annotated[Event | Heartbeat | RunStatusMessage | RunDeleted, Field(discriminator="type")]
_wire_adapter: TypeAdapter[Any] = TypeAdapter(Wire)


def parse_wire(data: dict[str, Any] | str | bytes) -> EventBase | WireMessage:
    """Parse one WebSocket message (a JSON text or its object)."""
    if isinstance(data, (str, bytes)):
        return _wire_adapter.validate_json(data)
    return _wire_adapter.validate_python(data)


HEARTBEAT_JSON = Heartbeat().model_dump_json()


def event_json(event: EventBase) -> str:
    """The JSON text of an event, as it appears in the log and on the wire."""
    return event.model_dump_json()


def schema_doc() -> dict[str, Any]:
    """JSON schema of every event type, for docs/events.md and the API."""
    return {cls.model_fields["type"].default: cls.model_json_schema() for cls in EVENT_TYPES}


__all__ = [
    "SCHEMA_VERSION", "EventBase", "Event", "EventLog", "parse_event", "read_events", "event_json",
    "RunStarted", "Status", "Step", "GpuDevice", "Gpu", "Eval", "Checkpoint", "Paused", "Resumed",
    "OomRecovered", "Warning_", "Error", "Completed", "Failed", "Cancelled", "FINAL_TYPES",
    "TERMINAL_STATUSES", "RunStatus", "WireMessage", "Heartbeat", "RunStatusMessage", "RunDeleted",
    "WIRE_TYPES", "Wire", "parse_wire", "HEARTBEAT_JSON",
]  # fmt: skip
