"""The Export page's state: start export jobs through the app's ExportJobs and follow them.

The page, the API (`POST /api/runs/{id}/exports`) and the Chat page's base-model export share one
job manager: each export is a child process, so the server never loads torch, and its state is
read back from the export's folder, so reloading the page (or restarting the server) loses nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import reflex as rx

from backpropagate.errors import BackpropError
from backpropagate.export.jobs import EXPORTABLE_STATUSES
from ui_app.state import service

FORMATS = ["gguf", "merged", "adapter"]
QUANTIZATIONS = {"gguf": ["q8_0", "f16", "q4_k_m", "f32"], "merged": ["f16", "bf16", "f32"], "adapter": ["-"]}
POLL_S = 0.5  # two reads of the job folders a second while an export runs
STAGE_NAMES = {
    "adapter": "Copying the adapter",
    "merge": "Merging the adapter",
    "convert": "Converting to GGUF",
    "quantize": "Quantizing",
    "verify": "Verifying against the original model",
    "ollama": "Registering with Ollama",
}
_local_jobs: Any = None


def quantizations(fmt: str, have_llama: bool) -> list[str]:
    """The choices for ``fmt``; without llama-cpp-python, none of the K-quants (they need llama.cpp)."""
    choices = QUANTIZATIONS.get(fmt, ["-"])
    return choices if have_llama else [q for q in choices if "_k" not in q]


def export_jobs() -> Any:
    """The ExportJobs of this server process: the API's own when it has one, so servers are shared."""
    global _local_jobs
    from backpropagate.export.jobs import ExportJobs

    state = service.api_state()
    if state is not None:
        if getattr(state, "export_jobs", None) is None:
            state.export_jobs = ExportJobs(state.settings)
        return state.export_jobs
    if _local_jobs is None:
        _local_jobs = ExportJobs(service.run_service().settings)
    return _local_jobs


def download_href(export_id: str, name: str) -> str:
    """A same-origin link to one of the export's files (the session cookie signs it)."""
    # Root-relative, never an absolute URL: it works through whatever origin served the page.
    return f"/api/exports/{quote(export_id, safe='')}/download?file={quote(name, safe='')}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def error_text(err: dict[str, Any] | None) -> tuple[str, str]:
    """``[CODE] message`` and the hint of an export's error (empty strings when there is none)."""
    if not err:
        return "", ""
    return f"[{err.get('code')}] {err.get('message')}", str(err.get("hint") or "")


def job_view(state: dict[str, Any]) -> dict[str, Any]:
    """One export's state from ExportJobs, as the strings and lists the page shows."""
    what = (
        state["format"] if not state.get("quantization") else f"{state['format']} · {state['quantization']}"
    )
    if state.get("base_model"):
        what = f"base model · {what}"
    details = []
    if state.get("path"):
        details.append({"label": "path", "value": str(state["path"])})
    report = state.get("verification") or {}
    if report:
        details.append(
            {
                "label": "mean KL",
                "value": f"{report.get('mean_kl', 0):.2e} (limit {report.get('kl_limit', '')})",
            }
        )
        details.append(
            {"label": "top-1 agreement", "value": f"{100 * report.get('top1_agreement', 0):.1f} %"}
        )
    if state.get("ollama_name"):
        details.append({"label": "Ollama model", "value": str(state["ollama_name"])})
    if state.get("seconds") is not None:
        details.append({"label": "took", "value": f"{state['seconds']:.0f} s"})
    error, hint = error_text(state.get("error"))
    stage = state.get("stage") or ""
    return {
        "id": state["id"],
        "what": what,
        "status": state["status"],
        "stage": STAGE_NAMES.get(stage, stage),
        "percent": round(100 * float(state.get("progress") or 0)),
        "details": details,
        "warnings": [str(w) for w in state.get("warnings") or []],
        "error": error,
        "hint": hint,
        "files": [
            {"name": f["name"], "size": _size(int(f["bytes"])), "href": download_href(state["id"], f["name"])}
            for f in state.get("files") or []
        ],
    }


def any_running(jobs: list[dict[str, Any]]) -> bool:
    return any(j["status"] == "running" for j in jobs)


async def run_exports(run_id: str) -> list[dict[str, Any]]:
    """Every export of the run, newest first, as page views."""
    states = await asyncio.to_thread(export_jobs().list_for_run, run_id)
    return [job_view(s) for s in reversed(states)]


async def start_export(
    run_id: str,
    fmt: str,
    quantization: str | None,
    verify: bool = True,
    ollama_name: str | None = None,
    base_model: bool = False,
) -> dict[str, Any]:
    """Start an export job of the run (the same checks as the API); returns its first state."""
    run = await service.run_service().get(run_id)
    return await asyncio.to_thread(
        export_jobs().start, run, fmt, quantization, verify, ollama_name or None, base_model
    )


class ExportState(rx.State):
    runs: list[dict[str, str]] = []
    run_id: str = ""
    fmt: str = "gguf"
    quantization: str = "q8_0"
    verify: bool = True
    ollama_name: str = ""
    jobs: list[dict[str, Any]] = []  # the run's exports, newest first
    current_id: str = ""  # the export this page started (shown on top)
    polling: bool = False
    error: str = ""
    hint: str = ""
    have_llama: bool = True  # llama-cpp-python (the export extra): K-quants, verification, chat
    extra_command: str = ""  # how to add it, when it is missing

    @rx.var
    def quant_choices(self) -> list[str]:
        return quantizations(self.fmt, self.have_llama)

    @rx.var
    def current(self) -> dict[str, Any]:
        return next((j for j in self.jobs if j["id"] == self.current_id), {})

    @rx.var
    def running(self) -> bool:
        return any_running(self.jobs)

    @rx.var
    def earlier(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs if j["id"] != self.current_id]

    def _fail(self, exc: BackpropError) -> None:
        self.error, self.hint = f"[{exc.code}] {exc.message}", exc.hint or ""

    @rx.event
    async def load(self) -> Any:
        self.error, self.hint = "", ""
        from backpropagate.extras import install_command, llama_cpp_installed

        self.have_llama = llama_cpp_installed()
        self.extra_command = "" if self.have_llama else install_command("export")
        if not self.have_llama:
            self.verify = False  # it would be skipped: say so instead of a ticked box that does nothing
            self.quantization = quantizations(self.fmt, False)[0]
        try:
            rows = await service.list_runs()
        except BackpropError as exc:
            self._fail(exc)
            return None
        # Completed runs export their adapter, stopped and interrupted ones their last checkpoint.
        done = [r for r in rows if r.get("status") in EXPORTABLE_STATUSES]
        done.sort(key=lambda r: r.get("created_at") or 0, reverse=True)
        self.runs = [{"id": r["id"], "label": f"{r.get('name') or r['id']} ({r['id']})"} for r in done]
        wanted = self.router.url.query_parameters.get("run", "")
        ids = {r["id"] for r in self.runs}
        if wanted in ids:
            self.run_id = wanted
        elif self.run_id not in ids:
            self.run_id = self.runs[0]["id"] if self.runs else ""
        return await self._refresh()

    async def _refresh(self) -> Any:
        self.jobs = await run_exports(self.run_id) if self.run_id else []
        if self.current_id and not any(j["id"] == self.current_id for j in self.jobs):
            self.current_id = ""
        if any_running(self.jobs) and not self.polling:
            return ExportState.poll
        return None

    @rx.event
    async def set_run(self, value: str) -> Any:
        self.run_id, self.current_id, self.error, self.hint = value, "", "", ""
        return await self._refresh()

    @rx.event
    def set_fmt(self, value: str) -> None:
        self.fmt = value
        self.quantization = quantizations(value, self.have_llama)[0]

    @rx.event
    def set_quantization(self, value: str) -> None:
        self.quantization = value

    @rx.event
    def set_verify(self, value: bool) -> None:
        self.verify = value

    @rx.event
    def set_ollama_name(self, value: str) -> None:
        self.ollama_name = value.strip()

    @rx.event
    async def start(self) -> Any:
        if not self.run_id:
            return None
        self.error, self.hint = "", ""
        quant = None if self.fmt == "adapter" else self.quantization
        ollama = self.ollama_name if self.fmt == "gguf" else ""
        try:
            state = await start_export(self.run_id, self.fmt, quant, self.verify, ollama)
        except BackpropError as exc:
            self.current_id = ""  # the error replaces the earlier export's card
            self._fail(exc)
            return None
        self.current_id = state["id"]
        return await self._refresh()

    @rx.event(background=True)
    async def poll(self) -> None:
        """Follow the run's running exports until none is left (one loop per page)."""
        async with self:
            if self.polling:
                return
            self.polling = True
        try:
            while True:
                async with self:
                    run_id = self.run_id
                views = await run_exports(run_id) if run_id else []
                async with self:
                    if run_id == self.run_id:
                        self.jobs = views
                    if not any_running(self.jobs):
                        return
                await asyncio.sleep(POLL_S)
        except BackpropError as exc:
            async with self:
                self._fail(exc)
        finally:
            async with self:
                self.polling = False
