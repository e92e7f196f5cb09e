"""The event hub: tails each live run's ``events.jsonl``, updates the store, fans events out.

One asyncio task per live run reads the log incrementally (a ``stat`` per poll, reads in a worker
thread), folds new events into the store, then offers them to subscribers through bounded
queues. A subscriber that falls behind is dropped from the live fan-out and catches up from the
log file, so no subscriber can slow the worker, the hub or another subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backpropagate.events import FINAL_TYPES, EventBase, RunDeleted, RunStatusMessage, parse_log_line
from backpropagate.logs import get_logger
from backpropagate.runs.store import Run, Store

log = get_logger(__name__)

POLL_S = 0.01  # how often an idle tail looks at the log's size (a stat call)
READ_CHUNK = 1 << 20  # at most this much is read per poll, so one burst cannot hog a thread
QUEUE_SIZE = 2048  # per-subscriber backlog before it is dropped to catch up from the file
HEARTBEAT_S = 15.0

# Markers placed in a subscriber's queue next to events.
DROPPED = "dropped"  # the subscriber fell behind: catch up from the log
ENDED = "ended"  # the run's tail finished (the worker is gone and the log drained)


@dataclass(eq=False)
class Subscription:
    queue: asyncio.Queue[Any] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    run_id: str | None = None  # None: every run's status changes

    def offer(self, item: Any) -> bool:
        """Queue ``item``; on overflow empty the queue and leave DROPPED so the reader catches up."""
        try:
            self.queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(DROPPED)
            return False


@dataclass(frozen=True, slots=True)
class Line:
    """One event with its JSON text as written in the log: sent as is, never re-serialised."""

    event: EventBase
    text: str

    @property
    def seq(self) -> int:
        return self.event.seq

    @property
    def type(self) -> str:
        return self.event.type  # type: ignore[attr-defined]


def parse_lines(raw: list[bytes], path: Path | str = "events.jsonl", first_line: int = 1) -> list[Line]:
    """Events of complete log lines; a line that is not an event is skipped with a warning."""
    out = []
    for lineno, line in enumerate(raw, start=first_line):
        line = line.strip()
        if not line:
            continue
        event = parse_log_line(line, path, lineno)
        if event is not None:
            out.append(Line(event, line.decode()))
    return out


class LogTail:
    """Incremental reader of one ``events.jsonl``: complete lines only, from a byte offset.

    A last line without a newline is still being written and waits for the next read. If the
    file shrinks (replaced or truncated), reading starts again from its beginning.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0  # complete lines read so far, for line numbers in warnings
        self._partial = b""

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def read(self) -> list[EventBase]:
        return [line.event for line in self.read_lines()]

    def read_lines(self) -> list[Line]:
        try:
            with self.path.open("rb") as fh:
                if os.fstat(fh.fileno()).st_size < self.offset:
                    log.warning("%s shrank; reading it again from the start", self.path)
                    self.offset, self.lines, self._partial = 0, 0, b""
                fh.seek(self.offset)
                data = fh.read(READ_CHUNK)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" after a complete line; else a line still being written
        first = self.lines + 1
        self.lines += len(lines)
        return parse_lines(lines, self.path, first)


OnEnd = Callable[[str, Run | None, bool], Awaitable[None]]


class EventHub:
    """Tail tasks for live runs and the subscribers of their events."""

    def __init__(self, store: Store, runs_dir: Path) -> None:
        self.store = store
        self.runs_dir = runs_dir
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._subs: dict[str, set[Subscription]] = {}
        self._status_subs: set[Subscription] = set()
        self.published = 0  # events fanned out since start (for the benchmark)

    def log_path(self, run_id: str) -> Path:
        return self.runs_dir / run_id / "events.jsonl"

    def is_live(self, run_id: str) -> bool:
        task = self._tails.get(run_id)
        return task is not None and not task.done()

    # Tailing ------------------------------------------------------------------
    def watch(self, run_id: str, alive: Callable[[], bool], on_end: OnEnd) -> None:
        """Start tailing ``run_id`` until ``alive()`` is false and the log is drained."""
        if self.is_live(run_id):
            return
        self._tails[run_id] = asyncio.create_task(self._tail(run_id, alive, on_end), name=f"tail-{run_id}")

    async def _tail(self, run_id: str, alive: Callable[[], bool], on_end: OnEnd) -> None:
        tail = LogTail(self.log_path(run_id))
        run = await asyncio.to_thread(self.store.find_run, run_id)
        last_seq = run.last_seq if run else 0
        saw_final = False  # a final event after the latest run_started
        try:
            while True:
                exited = not alive()  # checked before reading: anything written before exit is read
                events: list[Line] = []
                if tail.size() != tail.offset:  # grew, or shrank (then it is read again)
                    events = await asyncio.to_thread(tail.read_lines)
                if events:
                    for event in events:
                        kind = event.type
                        if kind == "run_started":
                            saw_final = False
                        elif kind in FINAL_TYPES:
                            saw_final = True
                    fresh = [e for e in events if e.seq > last_seq]
                    if fresh:
                        before = run.status if run else None
                        run = await asyncio.to_thread(
                            self.store.apply_events, run_id, [e.event for e in fresh]
                        )
                        # What this tail has read, not the row's last_seq: a foreground run's own
                        # store sync may be ahead of it, and its events must still be fanned out.
                        last_seq = fresh[-1].seq
                        for event in fresh:
                            self._publish(run_id, event)
                        if run.status != before or any(e.type == "step" for e in fresh):
                            self.publish_status(run)
                    continue  # read again at once: more may be waiting
                if exited:
                    break
                await asyncio.sleep(POLL_S)
        except asyncio.CancelledError:
            # Server shutdown: the worker keeps running and the next server re-attaches to it.
            self._tails.pop(run_id, None)
            raise
        except Exception:
            log.exception("tail of run %s failed", run_id)
        self._tails.pop(run_id, None)
        for sub in list(self._subs.get(run_id, ())):
            sub.offer(ENDED)
        await on_end(run_id, run, saw_final)

    async def stop_all(self) -> None:
        tasks = list(self._tails.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # Fan-out ------------------------------------------------------------------
    def _publish(self, run_id: str, event: Line) -> None:
        subs = self._subs.get(run_id)
        if not subs:
            return
        for sub in list(subs):
            if not sub.offer(event):
                subs.discard(sub)  # fell behind; it re-subscribes after catching up from the file
        self.published += 1

    def publish_status(self, run: Run) -> None:
        message = run_status_message(run)
        for sub in list(self._status_subs):
            if not sub.offer(message):
                self._status_subs.discard(sub)

    def publish_deleted(self, run_id: str) -> None:
        for sub in list(self._status_subs):
            sub.offer(RunDeleted(run_id=run_id, ts=time.time()))

    def subscribe(self, run_id: str | None) -> Subscription:
        sub = Subscription(run_id=run_id)
        if run_id is None:
            self._status_subs.add(sub)
        else:
            self._subs.setdefault(run_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.run_id is None:
            self._status_subs.discard(sub)
        else:
            subs = self._subs.get(sub.run_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    self._subs.pop(sub.run_id, None)

    # Streams ------------------------------------------------------------------
    async def stream(
        self, run_id: str, after: int = 0, heartbeat_s: float = HEARTBEAT_S
    ) -> AsyncIterator[Line | None]:
        """Events of ``run_id`` with seq > ``after``: history, then live; ``None`` is a heartbeat.

        Ends after a final event once the run is no longer live, or when its tail ends.
        """
        last = after
        path = self.log_path(run_id)
        while True:
            sub = self.subscribe(run_id)  # before reading history, so nothing falls in between
            try:
                history = await asyncio.to_thread(_read_after, path, last)
                for event in history:
                    yield event
                    last = event.seq
                if not self.is_live(run_id):
                    # No tail: the log is complete unless the run waits in the queue. It may
                    # have grown while the history above was sent, so read it to the end.
                    for event in await asyncio.to_thread(_read_after, path, last):
                        yield event
                        last = event.seq
                    if not await self._may_start(run_id):
                        return
                resync = False
                while not resync:
                    try:
                        item = sub.queue.get_nowait()  # the common case under load: no timer needed
                    except asyncio.QueueEmpty:
                        try:
                            item = await asyncio.wait_for(sub.queue.get(), heartbeat_s)
                        except TimeoutError:
                            yield None
                            continue
                    if isinstance(item, str) and item == DROPPED:
                        resync = True
                    elif isinstance(item, str):  # ENDED
                        for event in await asyncio.to_thread(_read_after, path, last):
                            yield event
                            last = event.seq
                        if not await self._may_start(run_id):
                            return
                        resync = True  # resumed meanwhile: follow the new worker
                    elif item.seq <= last:
                        continue
                    elif item.seq != last + 1:
                        resync = True  # a gap: the file has what we missed
                    else:
                        yield item
                        last = item.seq
                        if item.type in FINAL_TYPES:
                            return
            finally:
                self.unsubscribe(sub)

    async def _may_start(self, run_id: str) -> bool:
        """True while the run is queued or running: a stream should wait for its events."""
        if self.is_live(run_id):
            return True
        run = await asyncio.to_thread(self.store.find_run, run_id)
        return run is not None and run.status == "queued"


def _read_after(path: Path, after: int) -> list[Line]:
    """Complete lines of the log with seq > ``after`` (a torn last line is left for later)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return []
    lines = raw[: raw.rfind(b"\n") + 1].split(b"\n")[:-1]
    start = 0
    # seq n sits on line n of a gapless log: skip the lines before it without parsing them all
    # (a subscriber catching up must not cost a parse of the whole history each time).
    if 0 < after <= len(lines):
        event = parse_log_line(lines[after - 1], path, after)
        if event is not None and event.seq == after:
            start = after
    return [line for line in parse_lines(lines[start:], path, start + 1) if line.seq > after]


def run_status_message(run: Run) -> RunStatusMessage:
    """What /api/events sends when a run changes."""
    return RunStatusMessage(
        run_id=run.id,
        status=run.status,
        step=run.step,
        total_steps=run.total_steps,
        loss=run.loss,
        error_code=run.error_code,
        ts=time.time(),
    )
