"""What the pages show of a run: the one reducer (backpropagate/runs/fold.py) plus the timeline,
the ETA, GPU cards and formatting.

Pure functions over typed events, so a page that reconnects replays from its last seq and ends in
exactly the state of one that never left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from backpropagate.events import Completed, EventBase, RunStarted, RunStatus, Step, parse_event
from backpropagate.runs.fold import RunFold, downsample

__all__ = ["MAX_CHART_POINTS", "RunView", "config_diff", "downsample", "gpu_card", "status_text"]

MAX_CHART_POINTS = 1000
TIMELINE_LIMIT = 200
DOCS_ERRORS_URL = "https://github.com/backpropagate/backpropagate/blob/main/docs/error-codes.md"

# Events that appear in the timeline; step/gpu/eval are shown as charts and panels instead.
TIMELINE_TYPES = frozenset(
    {
        "run_started", "status", "checkpoint", "paused", "resumed", "oom_recovered",
        "warning", "error", "completed", "failed", "cancelled",
    }
)  # fmt: skip
TERMINAL = frozenset({"completed", "failed", "cancelled", "interrupted"})


def error_doc_url(code: str) -> str:
    """Link to the troubleshooting entry of an error code (anchors are the lower-cased code)."""
    return f"{DOCS_ERRORS_URL}#{code.lower()}"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def format_duration(seconds: float | None) -> str:
    """`1h 02m`, `3m 05s`, `42s`; empty for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


# Every text a page shows for a run's state comes from its status through these (RunStatus values).
STATUS_LABELS = {str(st): str(st).capitalize() for st in RunStatus}
STATUS_DETAILS = {"queued": "Queued: waiting for a free slot"}


LABELS = {"runtime_s": "Runtime (s)", "tokens_per_s": "Tokens/s", "grad_accum": "Gradient accumulation"}


def human_label(key: str) -> str:
    """A field name for people: `final_loss` → `Final loss`."""
    return LABELS.get(key) or key.replace("_", " ").capitalize()


def status_label(status: str) -> str:
    """The human label of a status: `Completed`; unknown ones lose their underscores."""
    return STATUS_LABELS.get(status) or status.replace("_", " ").capitalize()


def status_text(status: str, phase: str = "") -> str:
    """The state line of a run: the phase only while it runs (a finished run is not `saving`)."""
    if status == "running" and phase:
        return f"{status_label(status)} · {phase.replace('_', ' ')}"
    return STATUS_DETAILS.get(status, status_label(status))


PREFERENCE_KEYS = ("reward_margin", "reward_accuracy")


def timeline_entry(ev: dict[str, Any]) -> dict[str, str]:
    """One line of the timeline: kind (for colour), text, optional error code and its docs link."""
    t = ev.get("type", "")
    code = ev.get("code") or ""
    text = t
    if t == "run_started":
        resumed = ev.get("resumed_from_step")
        where = f" on {ev['device']}" if ev.get("device") else ""
        backend = f" ({ev['backend']})" if ev.get("backend") else ""
        text = f"Resumed from step {resumed}{where}{backend}" if resumed else f"Started{where}{backend}"
    elif t == "status":
        text = status_text(str(ev.get("status") or ""), ev.get("phase") or "")
        if ev.get("message"):
            text += f": {ev['message']}"
    elif t == "checkpoint":
        text = f"Checkpoint at step {ev.get('step')} ({_fmt_bytes(ev.get('bytes') or 0)})"
        if ev.get("best"):
            text += " — best so far"
    elif t == "paused":
        temp = f" at {ev['temperature_c']:.0f} °C" if ev.get("temperature_c") is not None else ""
        text = f"Paused ({ev.get('reason')}){temp}" + (f" at step {ev['step']}" if ev.get("step") else "")
    elif t == "resumed":
        temp = f" at {ev['temperature_c']:.0f} °C" if ev.get("temperature_c") is not None else ""
        text = f"Resumed ({ev.get('reason')}){temp}"
    elif t == "oom_recovered":
        text = (
            f"Out of memory at step {ev.get('step')}: micro-batch {ev.get('old_micro_batch')} → "
            f"{ev.get('new_micro_batch')}, accumulation {ev.get('grad_accum')}"
        )
    elif t in ("warning", "error", "failed"):
        label = {"warning": "Warning", "error": "Error", "failed": status_label("failed")}[t]
        text = f"{label}: {ev.get('message', '')}" + (f" — {ev['hint']}" if ev.get("hint") else "")
    elif t == "completed":
        loss = ev.get("final_loss")
        text = f"{status_label('completed')} at step {ev.get('step')}" + (
            f", final loss {loss:.4f}" if loss is not None else ""
        )
    elif t == "cancelled":
        text = status_label("cancelled") + (f" at step {ev['step']}" if ev.get("step") is not None else "")
        if ev.get("checkpoint"):
            text += " (checkpoint saved)"
    kind = {"warning": "warning", "error": "error", "failed": "error", "completed": "success"}.get(t, "info")
    return {
        "seq": str(ev.get("seq", "")),
        "ts": str(ev.get("ts", "")),
        "kind": kind,
        "text": text,
        "code": code,
        "url": error_doc_url(code) if code else "",
    }


@dataclass
class RunView(RunFold):
    """The run page's fold: the one reducer's fields and series, plus the timeline, the result
    and the ETA; ``apply`` is idempotent per seq (replays are safe)."""

    timeline: list[dict[str, str]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    # (ts, step) of recent steps, for the ETA
    _recent: list[tuple[float, int]] = field(default_factory=list)

    def apply(self, event: EventBase | dict[str, Any]) -> bool:  # type: ignore[override]
        """Fold one event (typed, or its JSON object) in; False when it was already seen."""
        ev = event if isinstance(event, EventBase) else parse_event(event)
        before = self.status
        if not super().apply(ev):
            return False
        if isinstance(ev, RunStarted):
            self.final = {}
            self._recent.clear()
        elif isinstance(ev, Step):
            if before in ("queued", "interrupted"):  # steps arriving say more than a stale status
                self.status = RunStatus.RUNNING
            self._recent = [*self._recent[-19:], (float(ev.ts), ev.step)]
        elif isinstance(ev, Completed):
            self.final = {
                k: getattr(ev, k) for k in ("step", "final_loss", "eval_loss", "adapter_path", "runtime_s")
            }
            self.final.update(ev.metrics)
        if ev.type in TIMELINE_TYPES:  # type: ignore[attr-defined]
            self.timeline.append(timeline_entry(ev.model_dump(mode="json")))
            del self.timeline[:-TIMELINE_LIMIT]
        return True

    @property
    def gpus(self) -> list[dict[str, Any]]:
        """The GPU panel's cards, from the last telemetry sample."""
        return [gpu_card(d) for d in self.gpu_devices]

    @property
    def preference(self) -> bool:
        """Whether the run trains a preference objective (its chart shows rewards)."""
        return (self.config or {}).get("objective", "sft") != "sft"

    @property
    def progress_pct(self) -> int:
        if not self.total_steps:
            return 100 if self.status == "completed" else 0
        return int(100 * min(self.step, self.total_steps) / self.total_steps)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace of the last steps; None when unknown or finished."""
        if self.status != "running" or len(self._recent) < 2 or not self.total_steps:
            return None
        (t0, s0), (t1, s1) = self._recent[0], self._recent[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return (self.total_steps - self.step) * (t1 - t0) / (s1 - s0)

    def chart_points(self, max_points: int = MAX_CHART_POINTS) -> list[dict[str, Any]]:
        """Train and eval loss on one step axis, bounded to ``max_points`` rows."""
        rows = downsample(self.steps, max_points)
        by_step = {r["step"]: _chart_row(r) for r in rows}
        for e in self.evals:
            by_step.setdefault(e["step"], {"step": e["step"]})["eval_loss"] = e["loss"]
        return [by_step[s] for s in sorted(by_step)]

    def summary(self) -> dict[str, Any]:
        """The scalar fields the runs table and the run header show, as strings where formatted."""
        return {
            "status": str(self.status),
            "phase": self.phase,
            "step": self.step,
            "total_steps": self.total_steps or 0,
            "progress": self.progress_pct,
            "loss": "" if self.loss is None else f"{self.loss:.4f}",
            "lr": "" if self.lr is None else f"{self.lr:.2e}",
            "grad_norm": "" if self.grad_norm is None else f"{self.grad_norm:.3f}",
            "tokens_per_s": "" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}",
            "eta": format_duration(self.eta_s),
            "micro_batch": "" if self.micro_batch is None else str(self.micro_batch),
            "device": self.device,
            "backend": self.backend,
        }


def _chart_row(point: dict[str, Any]) -> dict[str, Any]:
    """A step point as the charts draw it: reward keys only where a preference objective reports them."""
    row = {k: point.get(k) for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s")}
    row.update({k: point[k] for k in PREFERENCE_KEYS if point.get(k) is not None})
    return row


def gpu_card(d: dict[str, Any], warn_c: float = 80.0, pause_c: float = 90.0) -> dict[str, Any]:
    """A GPU panel's values: temperature level against the run's thresholds, VRAM percentage."""
    temp = d.get("temperature_c")
    used, total = d.get("memory_used_mb"), d.get("memory_total_mb")
    level = "ok"
    if temp is not None and temp >= pause_c:
        level = "critical"
    elif temp is not None and temp >= warn_c:
        level = "warm"
    return {
        "index": d.get("index", 0),
        "name": d.get("name") or f"GPU {d.get('index', 0)}",
        "temperature": "" if temp is None else f"{temp:.0f} °C",
        "level": level,
        "vram_pct": int(100 * used / total) if used is not None and total else 0,
        "vram": f"{(used or 0) / 1024:.1f} / {(total or 0) / 1024:.1f} GiB" if total else "",
        "util": "" if d.get("utilization_pct") is None else f"{d['utilization_pct']:.0f} %",
        "power": "" if d.get("power_w") is None else f"{d['power_w']:.0f} W",
    }


def config_diff(configs: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """Rows of the fields whose values differ between runs: {"field", <run_id>: value, ...}."""
    keys = sorted({k for c in configs.values() for k in c})
    rows = []
    for k in keys:
        values = {rid: c.get(k) for rid, c in configs.items()}
        if len({repr(v) for v in values.values()}) > 1:
            rows.append({"field": k, **{rid: "" if v is None else str(v) for rid, v in values.items()}})
    return rows
