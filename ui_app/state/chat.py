"""The Chat page's state: pick one or two GGUF exports and stream their replies to one conversation.

The model servers are llama.cpp child processes started by the same ExportJobs the API uses,
so the page and ``POST /api/chat`` share them; nothing heavy is imported in this process.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import reflex as rx

from backpropagate.errors import BackpropError
from ui_app.state import service

NONE = "none"  # the select value for "no second model" (a select item cannot have an empty value)
PUSH_EVERY_S = 0.25  # at most four pushes a second while replies stream
_local_jobs: Any = None


def _api_state() -> Any:
    """The API app's ``app.state`` (it holds the RunService and the export jobs), or None."""
    from reflex.utils.prerequisites import get_app

    rx_app = getattr(get_app(), "app", None)
    transformers = getattr(rx_app, "api_transformer", None) or []
    if not isinstance(transformers, (list, tuple)):
        transformers = [transformers]
    for t in transformers:
        state = getattr(t, "state", None)
        if getattr(state, "service", None) is not None:
            return state
    return None


def export_jobs() -> Any:
    """The ExportJobs of this server process: the API's own when it has one, so servers are shared."""
    global _local_jobs
    from backpropagate.runs.exports import ExportJobs

    try:
        state = _api_state()
    except Exception:  # noqa: BLE001 - no Reflex app here: use one of our own below
        state = None
    if state is not None:
        if getattr(state, "export_jobs", None) is None:
            state.export_jobs = ExportJobs(state.settings)
        return state.export_jobs
    if _local_jobs is None:
        _local_jobs = ExportJobs(service.run_service().settings)
    return _local_jobs


def gguf_choices(states: list[dict[str, Any]], run_names: dict[str, str]) -> list[dict[str, str]]:
    """The completed GGUF exports among export states, newest first, as select items."""
    done = [
        s for s in states if s.get("status") == "completed" and str(s.get("path") or "").endswith(".gguf")
    ]
    done.sort(key=lambda s: s.get("created_at") or 0, reverse=True)
    out = []
    for s in done:
        run = run_names.get(s["run_id"]) or s["run_id"]
        quant = s.get("quantization") or "gguf"
        out.append({"id": s["id"], "label": f"{run} · {quant} ({s['id']})"})
    return out


def history(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation to send: user and assistant turns with text (an empty pending bubble is left out)."""
    return [
        {"role": m["role"], "content": m["content"]}
        for m in messages
        if m.get("role") in ("system", "user", "assistant") and m.get("content")
    ]


class Reply:
    """One model's reply being streamed in a worker thread; the page reads ``text`` as it grows."""

    def __init__(self, export_id: str, messages: list[dict[str, str]]) -> None:
        self.export_id = export_id
        self.messages = messages
        self.pieces: list[str] = []
        self.error = ""
        self.note = ""
        self.done = threading.Event()

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def run(self, max_tokens: int = 256) -> None:
        from backpropagate.export.serve import stream_chat

        try:
            base_url = export_jobs().serve(self.export_id)
            for piece in stream_chat(base_url, self.messages, max_tokens=max_tokens):
                self.pieces.append(piece)
        except BackpropError as exc:
            self.error = f"[{exc.code}] {exc.message}"
        except Exception as exc:  # noqa: BLE001 - shown in the bubble instead of a silent stop
            self.error = f"The reply stopped: {exc}"
        else:
            if not self.pieces:  # tiny or barely trained models often stop at once; say so, not a blank
                self.note = "The model ended its reply without any text."
        finally:
            self.done.set()


def _run_all(replies: list[Reply]) -> None:
    for r in replies:
        r.run()


class ChatState(rx.State):
    exports: list[dict[str, str]] = []
    loaded: bool = False
    left_id: str = ""
    right_id: str = NONE
    left: list[dict[str, str]] = []
    right: list[dict[str, str]] = []
    draft: str = ""
    sending: bool = False
    error: str = ""

    @rx.var
    def two(self) -> bool:
        return self.right_id not in ("", NONE)

    @rx.var
    def right_choices(self) -> list[dict[str, str]]:
        return [{"id": NONE, "label": "No second model"}, *self.exports]

    @rx.event
    async def load(self) -> None:
        self.error = ""
        try:
            runs = await service.list_runs()
            jobs = export_jobs()
            states: list[dict[str, Any]] = []
            for r in runs:
                states += await asyncio.to_thread(jobs.list_for_run, r["id"])
        except BackpropError as exc:
            self.error = f"[{exc.code}] {exc.message}"
            self.loaded = True
            return
        names = {r["id"]: str(r.get("name") or r["id"]) for r in runs}
        self.exports = gguf_choices(states, names)
        ids = {e["id"] for e in self.exports}
        if self.left_id not in ids:
            self.left_id = self.exports[0]["id"] if self.exports else ""
        if self.right_id != NONE and self.right_id not in ids:
            self.right_id = NONE
        self.loaded = True

    @rx.event
    def set_left(self, value: str) -> None:
        self.left_id = value
        self.left = []

    @rx.event
    def set_right(self, value: str) -> None:
        self.right_id = value
        self.right = []

    @rx.event
    def set_draft(self, value: str) -> None:
        self.draft = value

    @rx.event
    def clear(self) -> None:
        if not self.sending:
            self.left, self.right, self.error = [], [], ""

    @rx.event(background=True)
    async def send(self) -> None:
        async with self:
            text = self.draft.strip()
            if self.sending or not text or not self.left_id:
                return
            self.sending, self.error, self.draft = True, "", ""
            columns = [("left", self.left_id)] + ([("right", self.right_id)] if self.two else [])
            replies = []
            for name, export_id in columns:
                msgs = [*getattr(self, name), {"role": "user", "content": text}]
                replies.append((name, Reply(export_id, history(msgs))))
                setattr(self, name, [*msgs, {"role": "assistant", "content": ""}])
        # llama.cpp's server drops a streaming reply when another request arrives, so one export
        # picked in both columns answers one column after the other; two exports answer at once.
        by_export: dict[str, list[Reply]] = {}
        for _, r in replies:
            by_export.setdefault(r.export_id, []).append(r)
        workers = [asyncio.create_task(asyncio.to_thread(_run_all, rs)) for rs in by_export.values()]
        while True:
            finished = all(r.done.is_set() for _, r in replies)
            async with self:
                for name, r in replies:
                    msgs = list(getattr(self, name))
                    content = r.text or ("…" if not r.done.is_set() else "")
                    msgs[-1] = {"role": "assistant", "content": content, "error": r.error or r.note}
                    setattr(self, name, msgs)
            if finished:
                break
            await asyncio.sleep(PUSH_EVERY_S)
        await asyncio.gather(*workers)
        async with self:
            self.sending = False
            errors = [r.error for _, r in replies if r.error]
            if errors:
                self.error = errors[0]
