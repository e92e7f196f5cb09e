"""The new-run page: pick and check a data set, choose a model and method, set hyperparameters, start.

The form is built from RunConfig's fields (names, defaults, choices, descriptions) and its
errors are RunConfig's own; the page adds no rules of its own.
"""

from __future__ import annotations

import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any

import reflex as rx
from pydantic import ValidationError

from backpropagate.config import DEMO_DEFAULTS, DEMO_STEPS, PRESETS, RunConfig, is_demo_model
from backpropagate.data.preference import ACCEPTS, NEEDS, check_objective_fits
from backpropagate.errors import BackpropError
from ui_app.components.chat import preview_row
from ui_app.components.layout import page
from ui_app.state import service

# Fields shown up front; every other field of RunConfig goes into the collapsed advanced section.
BASIC_FIELDS = [
    "name",
    "steps",
    "epochs",
    "max_seq_len",
    "batch_size",
    "grad_accum",
    "lr",
    "lora_r",
    "lora_alpha",
]
# Chosen in their own steps above the hyperparameters.
STEP_FIELDS = {"data", "model", "method", "preset", "data_format"}
# The objective is chosen beside the method; only the chosen objective's knobs are shown.
OBJECTIVES = ["sft", "dpo", "orpo", "simpo", "kto"]
OBJECTIVE_KNOBS: dict[str, list[str]] = {
    "sft": [],
    "dpo": ["beta", "dpo_loss_type", "label_smoothing"],
    "orpo": ["orpo_lambda"],
    "simpo": ["simpo_beta", "simpo_gamma"],
    "kto": ["beta", "kto_desirable_weight", "kto_undesirable_weight"],
}
OBJECTIVE_FIELDS = {"objective"} | {k for knobs in OBJECTIVE_KNOBS.values() for k in knobs}
# How the data check's format names read to a person.
FORMAT_NAMES = {
    "sharegpt": "ShareGPT chat",
    "openai": "openai chat",
    "alpaca": "Alpaca instructions",
    "text": "raw text",
    "preference": "preference pairs",
    "kto": "KTO rated rows {prompt, completion, label}",
}


def _choices(annotation: Any) -> list[str]:
    """The Literal values a field accepts (also inside ``X | Literal[...]``), as strings."""
    out: list[str] = []
    for arg in typing.get_args(annotation) or ():
        out += _choices(arg)
    if typing.get_origin(annotation) is typing.Literal:
        out = [str(a) for a in typing.get_args(annotation)]
    elif annotation is bool:
        out = ["true", "false"]
    return list(dict.fromkeys(out))


def _to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):  # e.g. report_to: comma-separated, empty for none
        return ",".join(str(v) for v in value)
    return str(value)


def field_specs() -> list[dict[str, Any]]:
    """One entry per RunConfig field: name, default text, choices (for a select) and help."""
    specs = []
    for name, info in RunConfig.model_fields.items():
        if name in STEP_FIELDS:
            continue
        choices = _choices(info.annotation)
        # Annotated[int, Field(...)] | Literal[...] is free text too: look through Annotated.
        args = [
            typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
            for a in typing.get_args(info.annotation)
        ]
        free = any(a in (int, float, str) for a in args)
        free = free or typing.get_origin(info.annotation) is list  # several values: comma-separated text
        specs.append(
            {
                "name": name,
                "default": ""
                if info.is_required()
                else _to_text(info.get_default(call_default_factory=True)),
                "choices": [] if free and set(choices) != {"true", "false"} else choices,
                "help": info.description or "",
            }
        )
    return specs


FIELDS = field_specs()
DEFAULTS = {f["name"]: f["default"] for f in FIELDS}


def knobs_shown(objective: str) -> list[str]:
    """The knobs the form shows for ``objective`` (none for sft)."""
    return list(OBJECTIVE_KNOBS.get(objective, []))


def objective_fit(objective: str, formats: dict[str, str]) -> str:
    """Why the checked file does not fit ``objective`` ("" when it does, or nothing is checked yet).

    The engine's own rule (check_objective_fits) decides; this only words it for the page.
    """
    if not formats or objective not in ACCEPTS:
        return ""
    try:
        check_objective_fits(objective, formats)
    except BackpropError:
        pass
    else:
        return ""
    wrong = sorted({FORMAT_NAMES.get(f, f) for f in formats.values() if f not in ACCEPTS[objective]})
    what = ("this file is " if len(formats) == 1 else "these files are ") + " and ".join(wrong)
    if objective == "sft":
        return (
            "sft cannot train on KTO rated rows {prompt, completion, label}: the unwanted replies "
            "would be learned as answers. Choose kto."
        )
    fitting = [o for o in OBJECTIVES if set(formats.values()) <= ACCEPTS[o]]
    choose = f"Choose {' or '.join(fitting)}, or pick" if fitting else "Pick"
    return f"{objective} needs {NEEDS[objective]}; {what}. {choose} a file that fits."


def form_to_config(
    values: dict[str, str], defaults: dict[str, str] = DEFAULTS, touched: Collection[str] | None = None
) -> dict[str, Any]:
    """The RunConfig input from the form: only fields the user changed, typed as RunConfig expects.

    Untouched fields are left out so that RunConfig's defaults, presets and the demo model's
    sizing apply at submission, exactly as at every other door. With ``touched`` (the fields the
    user edited) that is the rule; without it, a field equal to its general default counts as
    untouched.
    """
    out: dict[str, Any] = {}
    for name, text in values.items():
        text = text.strip()
        if name not in STEP_FIELDS:
            if touched is not None and name not in touched:
                continue
            if touched is None and text == defaults.get(name, ""):
                continue
        if text == "":
            continue
        if text in ("true", "false"):
            out[name] = text == "true"
            continue
        for cast in (int, float):
            try:
                out[name] = cast(text)
                break
            except ValueError:
                pass
        else:
            out[name] = text
        if name in ("data", "model", "name", "output_dir", "eval_data"):
            out[name] = text  # names that look like numbers stay names
    return out


def shown_values(values: dict[str, str], touched: Collection[str]) -> dict[str, str]:
    """The form's values with every untouched field showing what a run started now would use.

    RunConfig fills those in (the preset, then the demo model's sizing, then the field defaults),
    so a demo run shows batch 1 x 1, lr 5e-3 and 150 steps, not the general defaults.
    """
    raw = form_to_config(values, touched=touched)
    raw["data"] = raw.get("data") or "-"  # any name: the defaults do not depend on it
    config = None
    for attempt in (raw, {k: v for k, v in raw.items() if k in STEP_FIELDS}):
        try:
            config = RunConfig.model_validate(attempt)
            break
        except ValidationError:
            continue  # a touched field does not validate yet: show the rest from the step fields
    if config is None:
        return dict(values)
    filled = config.model_dump()
    return {
        **values,
        **{f["name"]: _to_text(filled[f["name"]]) for f in FIELDS if f["name"] not in touched},
    }


_START_VALUES = {**DEFAULTS, "model": "demo", "method": "lora", "preset": "", "data": ""}


class NewRunState(rx.State):
    values: dict[str, str] = shown_values(_START_VALUES, ())
    touched: list[str] = []  # fields the user edited: only these are sent
    data_label: str = ""
    datasets: list[dict[str, str]] = []
    examples: list[str] = []
    models: list[str] = []
    report: dict[str, Any] = {}
    formats: dict[str, str] = {}  # the checked data set's format per file
    preview: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    histogram: list[dict[str, Any]] = []
    problems: list[str] = []
    memory: str = ""
    memory_warning: str = ""
    gpu_text: str = ""
    message: str = ""
    busy: bool = False
    picked_dataset: str = ""  # the previous upload picked in the select

    @rx.event
    async def load(self):
        self.examples = service.example_files()
        self.models = await service.list_models()
        try:
            self.datasets = [
                {"id": str(d["id"]), "label": f"{d['original_name']} ({d['id']})"}
                for d in await service.list_datasets()
            ]
        except BackpropError as exc:
            self.message = f"[{exc.code}] {exc.message}"
        gpus = service.gpus()
        self.gpu_text = (
            ", ".join(f"{g.get('name')} ({(g.get('memory_total_mb') or 0) / 1024:.0f} GiB)" for g in gpus)
            if gpus
            else "No GPU detected: training runs on the CPU."
        )
        self._estimate()
        # /new?data=ID&objective=dpo (the Chat page's "Train on these ratings"): that data set, that objective.
        query = self.router.url.query_parameters
        if query.get("objective") in OBJECTIVES:
            self._set_objective(query["objective"])
        wanted = query.get("data", "")
        if wanted and any(d["id"] == wanted for d in self.datasets):
            async for _ in self._pick(wanted):
                yield

    def _set_objective(self, objective: str) -> None:
        self.values["objective"] = objective
        if "objective" not in self.touched:
            self.touched.append("objective")
        self.values = shown_values(self.values, self.touched)

    @rx.var
    def fit_problem(self) -> str:
        """Why the checked data set does not fit the chosen objective ("" when it fits)."""
        return objective_fit(self.values.get("objective", "sft"), self.formats)

    @rx.var
    def demo_note(self) -> str:
        """Said under the hyperparameters while a demo model is picked."""
        if not is_demo_model(self.values.get("model", "")):
            return ""
        d = DEMO_DEFAULTS
        return (
            f"Demo models train with batch {d['batch_size']} × {d['grad_accum']}, learning rate {d['lr']:g} "
            f"and {DEMO_STEPS} steps unless you change them; the fields show what this run will use."
        )

    @rx.var
    def start_blocked(self) -> str:
        """Why Start is disabled ("" when a run can start): no data yet, or data that cannot train."""
        if self.busy:
            return "Checking the data set…"
        if not self.values.get("data"):
            return "Choose a data set above (upload, a previous upload or an example) to start."
        if self.fit_problem:
            return self.fit_problem
        if self.report.get("ok"):
            return ""
        if not self.report.get("rows"):
            return (
                "No usable rows in this data set: fix the file as the check above says and upload it again."
            )
        if self.values.get("skip_bad_rows") == "true":
            return ""  # the bad rows are skipped and counted
        return (
            "The data check found bad rows (listed above): fix them and upload the file again, "
            "or set skip_bad_rows to true under Advanced settings to train on the good rows only."
        )

    @rx.event
    def set_value(self, name: str, value: str) -> None:
        self.values[name] = value
        self.problems = []
        if name not in STEP_FIELDS and name not in self.touched:
            self.touched.append(name)
        self.values = shown_values(self.values, self.touched)
        if name in ("model", "method", "max_seq_len", "batch_size", "lora_r", "gradient_checkpointing"):
            self._estimate()

    @rx.event
    def apply_preset(self, preset: str) -> None:
        self.values["preset"] = "" if preset == "none" else preset
        # The untouched fields now show what the preset fills in; RunConfig applies it on submit.
        self.values = shown_values(self.values, self.touched)
        self._estimate()

    def _estimate(self) -> None:
        model = self.values.get("model", "")
        try:
            est = service.memory_estimate(
                model, form_to_config(self.values, touched=self.values) | {"method": self.values["method"]}
            )
        except Exception:  # noqa: BLE001 - an estimate is a hint; a bad value is reported on submit
            est = None
        if not est:
            self.memory, self.memory_warning = (
                "Memory estimate appears once the model's config is on disk.",
                "",
            )
            return
        self.memory = (
            f"Estimated peak memory: {est['total_gib']:.2f} GiB (weights {est['weights_gib']:.2f} GiB)"
        )
        gpus = service.gpus()
        free = max(((g.get("memory_total_mb") or 0) / 1024 for g in gpus), default=0.0)
        self.memory_warning = (
            f"This does not fit the detected GPU ({free:.0f} GiB): lower the sequence length or batch, or use QLoRA."
            if gpus and est["total_gib"] > free
            else ""
        )

    async def _check(self, path: str, label: str) -> None:
        self.values["data"] = path
        self.data_label = label
        # The last file's report must not show under this file's name while it is checked.
        self.report, self.preview, self.histogram, self.errors, self.formats = {}, [], [], [], {}
        self.busy = True
        yield
        try:
            report = await service.validate(
                path,
                model=self.values.get("model") or "demo",
                max_seq_len=int(self.values.get("max_seq_len") or 1024),
                data_format=self.values.get("data_format") or "auto",
            )
        except BackpropError as exc:
            self.report, self.preview, self.histogram, self.formats = {}, [], [], {}
            self.errors = [{"where": "", "message": f"[{exc.code}] {exc.message}"}]
        except Exception as exc:  # noqa: BLE001 - shown to the user, the page stays usable
            self.report, self.errors = {}, [{"where": "", "message": f"{type(exc).__name__}: {exc}"}]
            self.formats = {}
        else:
            self.formats = {str(k): str(v) for k, v in (report.get("formats") or {}).items()}
            self.report = {
                "ok": report.get("ok"),
                "rows": report.get("rows"),
                "total_rows": report.get("total_rows"),
                "formats": ", ".join(sorted(set((report.get("formats") or {}).values()))),
                "over_max_len": report.get("over_max_len", 0),
                "duplicates": report.get("duplicates", 0),
                "tokens": (report.get("token_stats") or {}).get("p95", ""),
            }
            self.errors = [
                {"where": _where(e, label, path), "message": str(e.get("message", ""))}
                for e in (report.get("errors") or []) + (report.get("skipped") or [])
            ][:50]
            self.histogram = [
                {"range": f"{b['start']}–{b['end']}", "rows": b["count"]}
                for b in report.get("histogram") or []
            ]
            self.preview = [_bubbles(r) for r in report.get("preview") or []]
        self.busy = False

    @rx.event
    async def handle_upload(self, files: list[rx.UploadFile]):
        for f in files[:1]:
            name = f.name or "upload.jsonl"
            try:
                row = await service.save_upload(name, f.file, f.size)
            except BackpropError as exc:
                self.values["data"], self.data_label = "", ""  # nothing usable is picked now
                self.report, self.preview, self.histogram = {}, [], []
                self.errors = [{"where": name, "message": f"[{exc.code}] {exc.message}"}]
                return
            async for _ in self._check(row["stored_path"], name):
                yield

    @rx.event
    async def pick_dataset(self, dataset_id: str):
        async for _ in self._pick(dataset_id):
            yield

    async def _pick(self, dataset_id: str):
        rows = {d["id"]: d for d in await service.list_datasets()}
        if dataset_id in rows:
            self.picked_dataset = dataset_id
            async for _ in self._check(rows[dataset_id]["stored_path"], rows[dataset_id]["original_name"]):
                yield

    @rx.event
    async def pick_example(self, path: str):
        try:
            resolved = service.example_path(path)
        except BackpropError as exc:
            self.report, self.preview, self.histogram = {}, [], []
            self.errors = [{"where": "example", "message": f"[{exc.code}] {exc.message}"}]
            return
        async for _ in self._check(resolved, Path(resolved).name):
            yield

    @rx.event
    async def start(self) -> Any:
        config = form_to_config(self.values, touched=self.touched)
        try:
            run_id = await service.create_run(config)
        except BackpropError as exc:
            self.problems = (
                list(exc.details.get("problems") or [exc.message]) if exc.details else [exc.message]
            )
            return None
        return rx.redirect(f"/runs/{run_id}")


def _where(error: dict[str, Any], label: str, path: str) -> str:
    """Where a data error is, named as the user knows the file (the upload's own name, not the
    server's copy): ``quick.jsonl, line 3``."""
    file = str(error.get("file") or "")
    name = label if not file or Path(file).name == Path(path).name else Path(file).name
    line = error.get("line")
    return f"{name}, line {line}" if line else name


def _bubbles(row: dict[str, Any]) -> dict[str, Any]:
    """A preview row as chat turns: [{"role", "content"}], whatever its source format."""
    messages = row.get("messages")
    if isinstance(messages, list):
        turns = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in messages]
        # A preference pair shows both answers, a KTO row its completion and rating, as labelled turns.
        if "chosen" in row:
            turns += [
                {"role": "chosen", "content": str(row["chosen"])},
                {"role": "rejected", "content": str(row.get("rejected", ""))},
            ]
        elif "completion" in row:
            label = "desirable" if row.get("label") else "undesirable"
            turns.append({"role": f"completion ({label})", "content": str(row["completion"])})
        return {"turns": turns}
    if "prompt" in row or "chosen" in row:
        turns = [{"role": "user", "content": str(row.get("prompt", ""))}]
        turns.append({"role": "assistant", "content": str(row.get("chosen", row.get("completion", "")))})
        return {"turns": turns}
    text = row.get("text")
    return {"turns": [{"role": "text", "content": str(text if text is not None else row)}]}


def _field_input(spec: dict[str, Any]) -> rx.Component:
    name = spec["name"]
    control = (
        rx.select(
            spec["choices"],
            value=NewRunState.values[name],
            on_change=lambda v: NewRunState.set_value(name, v),
            name=name,
            aria_label=name,
        )
        if spec["choices"]
        else rx.input(
            value=NewRunState.values[name],
            on_change=lambda v: NewRunState.set_value(name, v),
            name=name,
            id=f"field-{name}",
            aria_label=name,
            placeholder=spec["default"] or "(unset)",
        )
    )
    return rx.box(
        rx.el.label(name, html_for=f"field-{name}", style={"font_weight": "500", "font_size": "14px"}),
        control,
        rx.text(spec["help"], size="1", color_scheme="gray"),
    )


def _data_step() -> rx.Component:
    s = NewRunState
    return rx.card(
        rx.heading("1. Data", size="4", as_="h2"),
        rx.upload(
            rx.vstack(
                rx.icon("upload"),
                rx.text("Drop a .jsonl, .json, .csv, .parquet or .txt file here, or click to choose one."),
                align="center",
            ),
            id="dataset-upload",
            multiple=False,
            max_files=1,
            on_drop=NewRunState.handle_upload(rx.upload_files(upload_id="dataset-upload")),
            border="1px dashed var(--gray-a7)",
            padding="1.5em",
            width="100%",
            margin_y="0.75em",
        ),
        rx.flex(
            rx.cond(
                s.datasets.length() > 0,
                rx.select.root(
                    rx.select.trigger(placeholder="Or pick a previous upload"),
                    rx.select.content(
                        rx.foreach(s.datasets, lambda d: rx.select.item(d["label"], value=d["id"]))
                    ),
                    value=s.picked_dataset,
                    on_change=NewRunState.pick_dataset,
                ),
            ),
            rx.cond(
                s.examples.length() > 0,
                rx.select.root(
                    rx.select.trigger(placeholder="Or an example file", id="example-picker"),
                    rx.select.content(rx.foreach(s.examples, lambda p: rx.select.item(p, value=p))),
                    on_change=NewRunState.pick_example,
                ),
            ),
            gap="3",
            wrap="wrap",
        ),
        rx.cond(s.busy, rx.hstack(rx.spinner(), rx.text("Checking the data set…"))),
        rx.cond(
            s.report.length() > 0,
            rx.vstack(
                rx.text(
                    s.data_label, ": ", s.report["rows"].to(str), " usable rows of ", s.report["total_rows"].to(str),
                    " · format ", s.report["formats"].to(str),
                    " · over max length ", s.report["over_max_len"].to(str),
                    " · duplicates ", s.report["duplicates"].to(str),
                    id="data-summary",
                ),
                rx.cond(
                    s.fit_problem != "",
                    rx.callout(s.fit_problem, color_scheme="red", icon="triangle_alert", id="objective-fit"),
                    rx.text(
                        "Fits the ", s.values["objective"], " objective.",
                        size="2", color_scheme="green", id="objective-fit",
                    ),
                ),
                rx.cond(
                    s.histogram.length() > 0,
                    rx.box(
                        rx.text("Token lengths", size="2", weight="medium"),
                        rx.recharts.bar_chart(
                            rx.recharts.bar(data_key="rows", fill="var(--indigo-9)", is_animation_active=False),
                            rx.recharts.x_axis(data_key="range"),
                            rx.recharts.y_axis(width=40),
                            rx.recharts.graphing_tooltip(),
                            data=s.histogram,
                            height=160,
                            width="100%",
                        ),
                        width="100%",
                        id="token-histogram",
                    ),
                ),
                rx.vstack(rx.foreach(s.preview, preview_row), width="100%", id="data-preview"),
                width="100%",
            ),
        ),
        rx.cond(
            s.errors.length() > 0,
            rx.callout.root(
                rx.callout.text(
                    rx.vstack(
                        rx.foreach(
                            s.errors, lambda e: rx.text(
                                rx.cond(e["where"] != "", rx.fragment(rx.code(e["where"]), ": ")),
                                e["message"],
                                size="2",
                                class_name="data-error",
                            )
                        ),
                        spacing="1",
                    )
                ),
                color_scheme="red",
                id="data-errors",
            ),
        ),
        width="100%",
    )  # fmt: skip


def _model_step() -> rx.Component:
    s = NewRunState
    return rx.card(
        rx.heading("2. Model and method", size="4", as_="h2"),
        rx.grid(
            rx.box(
                rx.el.label("Model (demo name, local folder or hub id)", html_for="field-model"),
                rx.input(
                    value=s.values["model"],
                    on_change=lambda v: NewRunState.set_value("model", v),
                    id="field-model",
                    list="model-options",
                ),
                rx.el.datalist(rx.foreach(s.models, lambda m: rx.el.option(value=m)), id="model-options"),
            ),
            rx.box(
                rx.el.label("Method", display="block"),
                rx.select(
                    ["lora", "qlora", "full"],
                    value=s.values["method"],
                    on_change=lambda v: NewRunState.set_value("method", v),
                    aria_label="Method",
                ),
            ),
            rx.box(
                rx.el.label("Objective", display="block"),
                rx.select.root(
                    rx.select.trigger(id="field-objective", aria_label="Objective", width="100%"),
                    rx.select.content(rx.foreach(OBJECTIVES, lambda o: rx.select.item(o, value=o))),
                    value=s.values["objective"],
                    on_change=lambda v: NewRunState.set_value("objective", v),
                ),
            ),
            rx.box(
                rx.el.label("Preset", display="block"),
                rx.select(
                    ["none", *PRESETS],
                    value=rx.cond(s.values["preset"] != "", s.values["preset"], "none"),
                    on_change=NewRunState.apply_preset,
                    aria_label="Preset",
                ),
            ),
            columns=rx.breakpoints(initial="1", sm="2", md="4"),
            gap="3",
            margin_y="0.75em",
        ),
        rx.text(_OBJECTIVE_HELP, size="1", color_scheme="gray"),
        _objective_knobs(),
        rx.text(s.gpu_text, size="2", id="gpu-text"),
        rx.text(s.memory, size="2", id="memory-estimate"),
        rx.cond(
            s.memory_warning != "", rx.callout(s.memory_warning, color_scheme="amber", icon="triangle_alert")
        ),
        width="100%",
    )


_OBJECTIVE_HELP = RunConfig.model_fields["objective"].description or ""


def _objective_knobs() -> rx.Component:
    """The chosen objective's knobs, each shown only while an objective that uses it is chosen."""
    objective = NewRunState.values["objective"]
    specs = {f["name"]: f for f in FIELDS}
    knobs = list(dict.fromkeys(k for ks in OBJECTIVE_KNOBS.values() for k in ks))
    shown = []
    for knob in knobs:
        users = [o for o, ks in OBJECTIVE_KNOBS.items() if knob in ks]
        visible = objective == users[0]
        for other in users[1:]:
            visible = visible | (objective == other)
        shown.append(rx.cond(visible, rx.box(_field_input(specs[knob]), class_name="objective-knob")))
    return rx.grid(
        *shown,
        columns=rx.breakpoints(initial="1", sm="2", md="3"),
        gap="3",
        margin_y="0.5em",
        id="objective-knobs",
    )


def _params_step() -> rx.Component:
    basic = [f for f in FIELDS if f["name"] in BASIC_FIELDS]
    advanced = [f for f in FIELDS if f["name"] not in BASIC_FIELDS and f["name"] not in OBJECTIVE_FIELDS]
    return rx.card(
        rx.heading("3. Hyperparameters", size="4", as_="h2"),
        rx.cond(
            NewRunState.demo_note != "",
            rx.text(NewRunState.demo_note, size="2", color_scheme="gray", id="demo-note", margin_y="0.5em"),
        ),
        rx.grid(
            *[_field_input(f) for f in basic], columns=rx.breakpoints(initial="1", sm="2", md="3"), gap="3"
        ),
        rx.el.details(
            rx.el.summary("Advanced settings", style={"cursor": "pointer", "margin": "1em 0"}),
            rx.grid(
                *[_field_input(f) for f in advanced],
                columns=rx.breakpoints(initial="1", sm="2", md="3"),
                gap="3",
            ),
        ),
        width="100%",
    )


def new_run_page() -> rx.Component:
    s = NewRunState
    return page(
        "New run",
        rx.vstack(
            _data_step(),
            _model_step(),
            _params_step(),
            rx.cond(
                s.problems.length() > 0,
                rx.callout.root(
                    rx.callout.text(rx.vstack(rx.foreach(s.problems, lambda p: rx.text(p, size="2")))),
                    color_scheme="red",
                    id="config-problems",
                ),
            ),
            rx.hstack(
                rx.button(
                    "Start training",
                    on_click=NewRunState.start,
                    size="3",
                    id="start-run",
                    disabled=s.start_blocked != "",
                ),
                rx.text(s.start_blocked, size="2", color_scheme="gray", id="start-blocked"),
                rx.text(s.message, size="2", color_scheme="gray"),
                align="center",
                wrap="wrap",
            ),
            spacing="4",
            width="100%",
        ),
        on_mount=NewRunState.load,
    )
