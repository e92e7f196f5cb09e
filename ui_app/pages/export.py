"""The export page: turn a finished run into an adapter, merged weights or a verified GGUF.

The export runs as `backprop export ... --json` in a child process: it loads torch and the
model, which the server process never does, and a crash there cannot take the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import reflex as rx

from backpropagate.errors import BackpropError
from ui_app.components.layout import page
from ui_app.state import service

FORMATS = ["gguf", "merged", "adapter"]
QUANTIZATIONS = {"gguf": ["f16", "q8_0", "q4_k_m", "f32"], "merged": ["f16", "bf16", "f32"], "adapter": ["-"]}


def export_command(run_id: str, fmt: str, quantization: str) -> list[str]:
    cmd = [sys.executable, "-m", "backpropagate", "export", run_id, "--format", fmt, "--json"]
    if fmt != "adapter" and quantization not in ("", "-"):
        cmd += ["--quantization", quantization]
    return cmd


def parse_failure(stderr: str) -> str:
    """The `[CODE] message` line (and its hint) the CLI printed, else the last lines of output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("[") and "]" in line:
            hint = next((h for h in lines[i + 1 : i + 2] if h.startswith("hint:")), "")
            return f"{line} {hint}".strip()
    return " ".join(lines[-3:]) or "The export stopped without a message."


class ExportState(rx.State):
    runs: list[dict[str, str]] = []
    run_id: str = ""
    fmt: str = "gguf"
    quantization: str = "q8_0"
    running: bool = False
    elapsed: str = ""
    output: str = ""
    result: dict[str, str] = {}
    error: str = ""

    @rx.var
    def quant_choices(self) -> list[str]:
        return QUANTIZATIONS.get(self.fmt, ["-"])

    @rx.event
    async def load(self) -> None:
        try:
            rows = await service.list_runs("completed")
        except BackpropError as exc:
            self.error = f"[{exc.code}] {exc.message}"
            return
        rows.sort(key=lambda r: r.get("created_at") or 0, reverse=True)
        self.runs = [{"id": r["id"], "label": f"{r.get('name') or r['id']} ({r['id']})"} for r in rows]
        wanted = self.router.url.query_parameters.get("run", "")
        if wanted:
            self.run_id = wanted
        elif self.runs and not self.run_id:
            self.run_id = self.runs[0]["id"]

    @rx.event
    def set_run(self, value: str) -> None:
        self.run_id = value

    @rx.event
    def set_fmt(self, value: str) -> None:
        self.fmt = value
        self.quantization = QUANTIZATIONS[value][0]

    @rx.event
    def set_quantization(self, value: str) -> None:
        self.quantization = value

    @rx.event(background=True)
    async def start(self) -> None:
        async with self:
            if self.running or not self.run_id:
                return
            self.running, self.error, self.result, self.output = True, "", {}, ""
            cmd = export_command(self.run_id, self.fmt, self.quantization)
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        stderr_lines: list[str] = []

        async def read_stderr() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                stderr_lines.append(raw.decode(errors="replace").rstrip())

        reader = asyncio.create_task(read_stderr())
        stdout_task = asyncio.create_task(proc.stdout.read())  # type: ignore[union-attr]
        while proc.returncode is None:
            with contextlib.suppress(TimeoutError):  # wake each second to show the elapsed time
                await asyncio.wait_for(proc.wait(), timeout=1.0)
            async with self:
                self.elapsed = f"{time.monotonic() - started:.0f} s"
                self.output = "\n".join(stderr_lines[-6:])
        await reader
        stdout = (await stdout_task).decode(errors="replace")
        async with self:
            self.running = False
            self.elapsed = f"{time.monotonic() - started:.0f} s"
            if proc.returncode == 0:
                self.result = _result_fields(stdout)
            else:
                self.error = parse_failure("\n".join(stderr_lines))


def _result_fields(stdout: str) -> dict[str, str]:
    try:
        data: dict[str, Any] = json.loads(stdout)
    except json.JSONDecodeError:
        return {"output": stdout.strip()[-500:]}
    out = {"path": str(data.get("path", "")), "format": str(data.get("format", ""))}
    if data.get("quantization"):
        out["quantization"] = str(data["quantization"])
    v = data.get("verification") or {}
    if v:
        out["mean KL"] = f"{v.get('mean_kl', 0):.2e} (limit {v.get('kl_limit', '')})"
        out["top-1 agreement"] = f"{100 * v.get('top1_agreement', 0):.1f} %"
    for note in data.get("warnings") or []:
        out.setdefault("warnings", "")
        out["warnings"] += str(note) + " "
    return out


def export_page() -> rx.Component:
    s = ExportState
    return page(
        "Export",
        rx.cond(
            s.runs.length() > 0,
            rx.card(
                rx.grid(
                    rx.box(
                        rx.el.label("Run", display="block"),
                        rx.select.root(
                            rx.select.trigger(placeholder="Pick a finished run", id="export-run"),
                            rx.select.content(
                                rx.foreach(s.runs, lambda r: rx.select.item(r["label"], value=r["id"]))
                            ),
                            value=s.run_id,
                            on_change=ExportState.set_run,
                        ),
                    ),
                    rx.box(
                        rx.el.label("Format", display="block"),
                        rx.select(FORMATS, value=s.fmt, on_change=ExportState.set_fmt, aria_label="Format"),
                    ),
                    rx.box(
                        rx.el.label("Quantization", display="block"),
                        rx.select(
                            s.quant_choices,
                            value=s.quantization,
                            on_change=ExportState.set_quantization,
                            aria_label="Quantization",
                        ),
                    ),
                    columns=rx.breakpoints(initial="1", sm="3"),
                    gap="3",
                ),
                rx.hstack(
                    rx.button("Export", on_click=ExportState.start, loading=s.running, id="start-export"),
                    rx.cond(s.running, rx.text("Exporting… ", s.elapsed, size="2", id="export-progress")),
                    align="center",
                    margin_top="1em",
                ),
                rx.cond(
                    s.output != "",
                    rx.el.pre(s.output, style={"font_size": "12px", "white_space": "pre-wrap"}),
                ),
                width="100%",
            ),
            rx.text(
                "No finished runs yet: a run can be exported once it has completed.", id="export-no-runs"
            ),
        ),
        rx.cond(
            s.error != "", rx.callout(s.error, color_scheme="red", icon="triangle_alert", id="export-error")
        ),
        rx.cond(
            s.result.length() > 0,
            rx.card(
                rx.heading("Exported", size="3", as_="h2"),
                rx.data_list.root(
                    rx.foreach(
                        s.result.entries(),
                        lambda kv: rx.data_list.item(rx.data_list.label(kv[0]), rx.data_list.value(kv[1])),
                    )
                ),
                rx.text("in ", s.elapsed, size="1", color_scheme="gray"),
                id="export-result",
                margin_top="1em",
            ),
        ),
        on_mount=ExportState.load,
    )
