"""The export page: turn a finished run into an adapter, merged weights or a verified GGUF.

Exports run as background jobs of the app's ExportJobs (the same ones `POST /api/runs/{id}/exports`
starts); the page shows their progress, results and download links, and the run's earlier exports.
"""

from __future__ import annotations

import reflex as rx

from ui_app.components.layout import page
from ui_app.state.export import FORMATS, ExportState


def _field(label: str, control: rx.Component) -> rx.Component:
    # min_width 0: a long run name shortens (ellipsis) instead of widening the grid past a phone screen
    return rx.box(rx.el.label(label, display="block"), control, min_width="0")


def _form() -> rx.Component:
    s = ExportState
    return rx.card(
        rx.grid(
            _field(
                "Run",
                rx.select.root(
                    rx.select.trigger(placeholder="Pick a finished run", id="export-run", width="100%"),
                    rx.select.content(
                        rx.foreach(s.runs, lambda r: rx.select.item(r["label"], value=r["id"]))
                    ),
                    value=s.run_id,
                    on_change=ExportState.set_run,
                ),
            ),
            _field(
                "Format", rx.select(FORMATS, value=s.fmt, on_change=ExportState.set_fmt, aria_label="Format")
            ),
            _field(
                "Quantization",
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
        rx.cond(
            s.fmt == "gguf",
            rx.grid(
                _field(
                    "Register with Ollama as (optional)",
                    rx.input(
                        value=s.ollama_name,
                        on_change=ExportState.set_ollama_name,
                        placeholder="my-model",
                        id="export-ollama-name",
                        aria_label="Register with Ollama as",
                    ),
                ),
                rx.flex(
                    rx.checkbox(
                        "Verify against the original model",
                        checked=s.verify,
                        on_change=ExportState.set_verify,
                        disabled=~s.have_llama,
                        id="export-verify",
                    ),
                    align="end",
                ),
                columns=rx.breakpoints(initial="1", sm="2"),
                gap="3",
                margin_top="0.75em",
            ),
        ),
        rx.cond(
            ~s.have_llama,
            rx.callout.root(
                rx.callout.icon(rx.icon("info")),
                rx.callout.text(
                    "K-quants (q4_k_m), verification against the original model and the Chat page need "
                    "llama-cpp-python (the export extra), which this install does not have; f16 and q8_0 "
                    "work without it. Add it (it needs a C compiler and cmake), then restart the app:"
                ),
                rx.code(
                    s.extra_command, id="export-extra-command", white_space="pre-wrap", word_break="break-all"
                ),
                id="export-extra-missing",
                margin_top="0.75em",
            ),
        ),
        rx.button(
            "Export", on_click=ExportState.start, loading=s.running, id="start-export", margin_top="1em"
        ),
        width="100%",
    )


def _downloads(files: rx.Var, export_id: rx.Var) -> rx.Component:
    return rx.flex(
        rx.foreach(
            files.to(list[dict[str, str]]),
            # A plain <a download> (not rx.link): the client-side router must not take the click.
            lambda f: rx.el.a(
                rx.button(
                    rx.icon("download", size=14),
                    f["name"],
                    " (",
                    f["size"],
                    ")",
                    variant="soft",
                    size="1",
                    # long file names wrap inside the button on a phone instead of spilling out of it
                    height="auto",
                    min_height="24px",
                    padding_y="0.25em",
                    white_space="normal",
                    word_break="break-all",
                    text_align="left",
                ),
                href=f["href"],
                on_click=rx.download(url=f["href"], filename=f["name"]).prevent_default,
                class_name="export-download",
                custom_attrs={"download": f["name"], "data-file": f["name"], "data-export": export_id},
            ),
        ),
        wrap="wrap",
        gap="2",
    )


def _error(job: rx.Var) -> rx.Component:
    return rx.callout.root(
        rx.callout.icon(rx.icon("triangle_alert")),
        rx.callout.text(job["error"].to(str)),
        rx.cond(job["hint"].to(str) != "", rx.callout.text("hint: ", job["hint"].to(str), size="1")),
        color_scheme="red",
        class_name="export-job-error",
    )


def _current() -> rx.Component:
    job = ExportState.current
    return rx.card(
        rx.heading(job["what"].to(str), size="3", as_="h2"),
        rx.match(
            job["status"].to(str),
            (
                "running",
                rx.vstack(
                    rx.text(
                        "Exporting… ", job["stage"].to(str), " (", job["percent"].to(str), " %)", size="2"
                    ),
                    rx.progress(
                        value=job["percent"].to(int), max=100, width="100%", id="export-progress-bar"
                    ),
                    id="export-progress",
                    width="100%",
                ),
            ),
            (
                "completed",
                rx.box(
                    rx.data_list.root(
                        rx.foreach(
                            job["details"].to(list[dict[str, str]]),
                            lambda kv: rx.data_list.item(
                                rx.data_list.label(kv["label"]), rx.data_list.value(kv["value"])
                            ),
                        )
                    ),
                    rx.foreach(
                        job["warnings"].to(list[str]),
                        lambda w: rx.text("warning: ", w, size="1", color_scheme="amber"),
                    ),
                    rx.box(_downloads(job["files"], job["id"]), margin_top="0.75em"),
                    id="export-result",
                ),
            ),
            rx.box(
                _error(job),
                rx.box(_downloads(job["files"], job["id"]), margin_top="0.75em"),
                id="export-error",
            ),
        ),
        width="100%",
        margin_top="1em",
        id="export-current",
    )


def _earlier_row(job: rx.Var) -> rx.Component:
    return rx.box(
        rx.hstack(
            rx.text(job["what"].to(str), weight="medium", size="2"),
            rx.badge(job["status"].to(str)),
            rx.cond(
                job["status"].to(str) == "running",
                rx.progress(value=job["percent"].to(int), max=100, width="8em"),
            ),
            rx.text(job["id"].to(str), size="1", color_scheme="gray"),
            align="center",
            wrap="wrap",
        ),
        rx.cond(job["error"].to(str) != "", _error(job)),
        _downloads(job["files"], job["id"]),
        class_name="export-earlier",
        custom_attrs={"data-export": job["id"].to(str)},
        padding_y="0.5em",
        border_bottom="1px solid var(--gray-a4)",
    )


def export_page() -> rx.Component:
    s = ExportState
    return page(
        "Export",
        rx.cond(
            s.runs.length() > 0,
            _form(),
            rx.text(
                "No finished runs yet: a run can be exported once it has completed.", id="export-no-runs"
            ),
        ),
        rx.cond(
            s.error != "",
            rx.callout.root(
                rx.callout.icon(rx.icon("triangle_alert")),
                rx.callout.text(s.error),
                rx.cond(s.hint != "", rx.callout.text("hint: ", s.hint, size="1")),
                color_scheme="red",
                id="export-error",
                margin_top="1em",
            ),
        ),
        rx.cond(s.current.length() > 0, _current()),
        rx.cond(
            s.earlier.length() > 0,
            rx.card(
                rx.heading("Exports of this run", size="3", as_="h2"),
                rx.foreach(s.earlier, _earlier_row),
                id="export-list",
                width="100%",
                margin_top="1em",
            ),
        ),
        on_mount=ExportState.load,
    )
