"""The Chat page's state: pick one or two GGUF exports and stream their replies to one conversation.

Replies can be rated into training data: the better of two (a pair for DPO) or one up or down
(a row for KTO), appended to the home's chat ratings data sets (backpropagate/runs/ratings.py).

The model servers are llama.cpp child processes started by the same ExportJobs the API uses,
so the page and ``POST /api/chat`` share them; nothing heavy is imported in this process. The
run's base model (without the adapter) is exported through the same jobs to answer beside it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import reflex as rx

from backpropagate.errors import BackpropError, ErrorCode
from ui_app.state import service
from ui_app.state.export import export_jobs, job_view, start_export

NONE = "none"  # the select value for "no second model" (a select item cannot have an empty value)
PUSH_EVERY_S = 0.25  # at most four pushes a second while replies stream
POLL_S = 0.5  # how often the base model's export is read while it runs


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
        label = f"{run} · {quant} ({s['id']})"
        out.append(
            {
                "id": s["id"],
                "label": f"base model of {label}" if s.get("base_model") else label,
                "run_id": s["run_id"],
                "quantization": quant,
                "verify": "yes" if s.get("verify", True) else "",
                "base": "yes" if s.get("base_model") else "",
            }
        )
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


def last_reply(messages: list[dict[str, str]]) -> str:
    """The latest finished reply's text ("" while none, or when the model said nothing)."""
    if not messages or messages[-1].get("role") != "assistant":
        return ""
    return messages[-1].get("content", "").strip()


def prompt_of(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation a reply answered, as training data takes it: user and assistant turns
    alternating, ending with the user's. An exchange whose reply came back empty is left out."""
    out: list[dict[str, str]] = []
    for m in messages:
        role, content = m.get("role"), str(m.get("content") or "")
        if role == "user":
            if out and out[-1]["role"] == "user":
                out.pop()  # the reply to it was empty: that exchange is not part of the prompt
            out.append({"role": "user", "content": content})
        elif role == "assistant" and content.strip() and out and out[-1]["role"] == "user":
            out.append({"role": "assistant", "content": content})
    return out


def rating_rows(
    col: str,
    left: list[dict[str, str]],
    right: list[dict[str, str]],
    left_id: str,
    right_id: str,
    up: bool | None = None,
) -> tuple[str, dict[str, Any]]:
    """The ratings data set kind and row for marking ``col``'s latest reply.

    ``up`` None marks it the better of the two (a pair); True or False rates it alone (KTO).
    The prompt is the marked column's conversation up to its latest user message: the history
    the reply answered (both columns share the user's messages).
    """
    from backpropagate.runs import ratings

    if col not in ("left", "right"):
        raise BackpropError(ErrorCode.INPUT_REQUEST_INVALID, f"No chat column {col!r}.")
    mine, other = (left, right) if col == "left" else (right, left)
    mine_id, other_id = (left_id, right_id) if col == "left" else (right_id, left_id)
    prompt = prompt_of(mine[:-1])
    if up is None:
        return "pairs", ratings.pair_row(prompt, last_reply(mine), last_reply(other), mine_id, other_id)
    return "kto", ratings.kto_row(prompt, last_reply(mine), up, mine_id)


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
    base_id: str = ""  # the base-model export being made for the left column's run
    base_status: str = ""
    base_stage: str = ""
    base_percent: int = 0
    base_error: str = ""
    asked_run: str = ""  # /chat?run=ID for a run without a GGUF export
    extra_command: str = ""  # how to add llama-cpp-python (the chat's model server) when it is missing
    asked_run_name: str = ""
    rated_pair: bool = False  # the latest exchange has been marked (one pair per exchange)
    rated_left: bool = False  # ... and each column's latest reply rated up or down
    rated_right: bool = False
    pairs_id: str = ""  # the chat ratings data sets and their rows
    pairs_count: int = 0
    kto_id: str = ""
    kto_count: int = 0
    rate_error: str = ""

    @rx.var
    def left_ready(self) -> bool:
        return not self.sending and last_reply(self.left) != ""

    @rx.var
    def right_ready(self) -> bool:
        return not self.sending and self.two and last_reply(self.right) != ""

    @rx.var
    def two(self) -> bool:
        return self.right_id not in ("", NONE)

    @rx.var
    def right_choices(self) -> list[dict[str, str]]:
        return [{"id": NONE, "label": "No second model"}, *self.exports]

    @rx.var
    def left_choice(self) -> dict[str, str]:
        return next((e for e in self.exports if e["id"] == self.left_id), {})

    @rx.event
    async def load(self) -> None:
        await self._load_choices()

    async def _load_choices(self) -> None:
        self.error = ""
        from backpropagate.extras import install_command, llama_cpp_installed

        self.extra_command = "" if llama_cpp_installed() else install_command("export")
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
        wanted = self.router.url.query_parameters.get("run", "")  # /chat?run=ID from a run's page
        of_run = [e["id"] for e in self.exports if e.get("run_id") == wanted]
        # A run that has no GGUF yet: say so and link to exporting that run, whatever else exists.
        self.asked_run = wanted if wanted in names and not of_run else ""
        self.asked_run_name = names.get(self.asked_run, "")
        if wanted and of_run:
            self.left_id = of_run[0]
        elif self.left_id not in ids:
            self.left_id = self.exports[0]["id"] if self.exports else ""
        if self.right_id != NONE and self.right_id not in ids:
            self.right_id = NONE
        self.loaded = True
        await self._load_ratings()

    async def _load_ratings(self) -> None:
        from backpropagate.runs import ratings

        svc = service.run_service()
        got = await asyncio.to_thread(ratings.summary, svc.store, svc.settings)
        self.pairs_id, self.pairs_count = (
            got.get("pairs", {}).get("id", ""),
            got.get("pairs", {}).get("rows", 0),
        )
        self.kto_id, self.kto_count = got.get("kto", {}).get("id", ""), got.get("kto", {}).get("rows", 0)

    def _reset_rated(self) -> None:
        self.rated_pair = self.rated_left = self.rated_right = False
        self.rate_error = ""

    async def _save_rating(self, col: str, up: bool | None) -> bool:
        from backpropagate.runs import ratings

        try:
            kind, row = rating_rows(col, self.left, self.right, self.left_id, self.right_id, up)
            svc = service.run_service()
            await asyncio.to_thread(ratings.add_rating, svc.store, svc.settings, kind, row)
        except BackpropError as exc:
            self.rate_error = f"[{exc.code}] {exc.message}"
            return False
        self.rate_error = ""
        await self._load_ratings()
        return True

    @rx.event
    async def prefer(self, col: str) -> None:
        """Mark ``col``'s latest reply as the better of the two: one pair for DPO."""
        if self.sending or self.rated_pair or not self.two:
            return
        if await self._save_rating(col, None):
            self.rated_pair = True

    @rx.event
    async def rate(self, col: str, up: bool) -> None:
        """Rate ``col``'s latest reply alone, up or down: one row for KTO."""
        done = self.rated_left if col == "left" else self.rated_right
        if self.sending or done:
            return
        if await self._save_rating(col, bool(up)):
            if col == "left":
                self.rated_left = True
            else:
                self.rated_right = True

    @rx.event
    def set_left(self, value: str) -> None:
        self.left_id = value
        self.left = []
        self._reset_rated()
        self.base_id, self.base_status, self.base_error = "", "", ""

    @rx.event(background=True)
    async def make_base(self) -> None:
        """Export the base model of the left column's run (same quantization), then put it on the right."""
        async with self:
            picked = next((e for e in self.exports if e["id"] == self.left_id), None)
            if picked is None or self.base_status == "running":
                return
            self.base_error, self.base_status, self.base_stage, self.base_percent = "", "running", "", 0
        try:
            state = await start_export(
                picked["run_id"], "gguf", picked["quantization"], bool(picked["verify"]), base_model=True
            )
            while True:
                view = job_view(state)  # the Export page's reading of a job's state
                async with self:
                    self.base_id, self.base_status = view["id"], view["status"]
                    self.base_stage, self.base_percent = view["stage"], view["percent"]
                    self.base_error = (
                        f"{view['error']} hint: {view['hint']}" if view["hint"] else view["error"]
                    )
                if state["status"] != "running":
                    break
                await asyncio.sleep(POLL_S)
                state = await asyncio.to_thread(export_jobs().status, state["id"])
        except BackpropError as exc:
            async with self:
                self.base_status, self.base_error = "failed", f"[{exc.code}] {exc.message}"
            return
        if state["status"] == "completed":
            async with self:
                await self._load_choices()  # the base export is now one of the choices
                self.right_id, self.right = state["id"], []
                self._reset_rated()

    @rx.event
    def set_right(self, value: str) -> None:
        self.right_id = value
        self.right = []
        self._reset_rated()

    @rx.event
    def set_draft(self, value: str) -> None:
        self.draft = value

    @rx.event
    def clear(self) -> None:
        if not self.sending:
            self.left, self.right, self.error = [], [], ""
            self._reset_rated()

    @rx.event(background=True)
    async def send(self) -> None:
        async with self:
            text = self.draft.strip()
            if self.sending or not text or not self.left_id:
                return
            self.sending, self.error, self.draft = True, "", ""
            self._reset_rated()  # a new exchange can be rated again
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
