"""Evaluation jobs for the API: each evaluation runs in its own subprocess, like an export.

A job lives in ``runs/<run_id>/evals/<eval_id>/``: ``.job.json`` (the request), ``.progress.jsonl``
(lines the job appends), ``.job.log``, and ``result.json`` once done (the object `backprop eval
--json` prints). Its state is read back from those files, so it survives a server restart; an
evaluation made with the CLI (no job file) is listed as a completed one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export.job import JOB_FILE, LOG_FILE, PROGRESS_FILE
from backpropagate.export.jobs import _pid_is_job, _read_progress, _tail, weights_source
from backpropagate.logs import get_logger
from backpropagate.runs.store import Run, Store
from backpropagate.settings import Settings

log = get_logger(__name__)

JOB_MODULE = "backpropagate.evaluation.job"
RESULT_FILE = "result.json"  # the runner's name for it; repeated here so the server never imports torch
EVALUABLE_STATUSES = frozenset({"completed", "cancelled"})
EVAL_ID = re.compile(r"^eval-[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")
_UPLOAD_ID = re.compile(r"^ds-[0-9A-Za-z]+$")
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


def resolve_eval_data(value: str, settings: Settings, store: Store) -> str:
    """An uploaded data set id becomes its file; a path must lie inside an allowed folder and exist."""
    from backpropagate.server.security.paths import safe_path

    uploaded = store.find_dataset(value)
    if uploaded is not None:
        return uploaded.stored_path
    if _UPLOAD_ID.match(value):
        raise BackpropError(ErrorCode.DATASET_NOT_FOUND, f"No uploaded data set with id {value!r}.")
    bases = [settings.datasets_dir, EXAMPLES_DIR, settings.home, Path.home()]
    # A relative path resolves against the first allowed folder that holds it (examples/... too).
    relative = not Path(value).is_absolute() and not value.startswith("~")
    found = next((b for b in [*bases, EXAMPLES_DIR.parent] if relative and (b / value).exists()), None)
    path = safe_path(found / value if found else value, *bases)
    if not path.is_file():
        raise BackpropError(ErrorCode.DATASET_NOT_FOUND, f"Eval file {value!r} does not exist.")
    return str(path)


def _plan(job: dict[str, Any]) -> list[str]:
    sides = ["run"] + (["vs"] if job.get("vs") else [])
    stages = []
    for side in sides:
        if job.get("data"):
            stages.append(f"generate:{side}")
        stages.append(f"loss:{side}")
    return stages


class EvalJobs:
    """Starts evaluation jobs and reads their state from their folders."""

    def __init__(self, settings: Settings, command: list[str] | None = None) -> None:
        self.settings = settings
        self.runs_dir = settings.runs_dir.resolve()
        self.command = command or [sys.executable, "-m", JOB_MODULE]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def check_evaluable(self, run: Run) -> Path:
        """The run folder of a run with trained weights; a coded error otherwise."""
        run_dir = self.runs_dir / run.id
        if run.status in ("queued", "running", "paused"):
            raise BackpropError(
                ErrorCode.STATE_RUN_ACTIVE,
                f"Run {run.id} is {run.status}; evaluate it once it has completed or been stopped.",
            )
        if run.status not in EVALUABLE_STATUSES or weights_source(run, run_dir) is None:
            raise BackpropError(
                ErrorCode.STATE_RUN_NOT_EVALUABLE,
                f"Run {run.id} is {run.status} and has no trained weights to evaluate.",
            )
        return run_dir

    def start(
        self,
        run: Run,
        *,
        data: str | None,
        vs: str | None,
        vs_run: Run | None = None,
        max_new_tokens: int = 64,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Write the job folder and start its process; ``data`` is already resolved."""
        run_dir = self.check_evaluable(run)
        vs_arg = vs
        if vs_run is not None:
            vs_arg = str(self.check_evaluable(vs_run))
        eval_id = f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        job_dir = run_dir / "evals" / eval_id
        job_dir.mkdir(parents=True)
        job = {
            "id": eval_id,
            "run_id": run.id,
            "run_dir": str(run_dir),
            "data": data,
            "vs": vs_arg,
            "vs_id": vs,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "created_at": time.time(),
        }
        (job_dir / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")
        env = {**os.environ, "BACKPROPAGATE_HOME": str(self.settings.home), "PYTHONUNBUFFERED": "1"}
        with (job_dir / LOG_FILE).open("ab") as out:
            proc = subprocess.Popen(
                [*self.command, str(job_dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=job_dir,
                start_new_session=True,  # a signal to the server does not stop the evaluation
            )
        job["pid"] = proc.pid
        (job_dir / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")
        with self._lock:
            self.procs[eval_id] = proc
        log.info("started evaluation %s of run %s (pid %d)", eval_id, run.id, proc.pid)
        return self.status(run.id, eval_id)

    def job_dir(self, run_id: str, eval_id: str) -> Path:
        folder = self.runs_dir / run_id / "evals" / eval_id
        if not EVAL_ID.match(eval_id) or not folder.is_dir():
            raise BackpropError(ErrorCode.STATE_NOT_FOUND, f"Run {run_id} has no evaluation {eval_id!r}.")
        return folder

    def _alive(self, eval_id: str, job: dict[str, Any], job_dir: Path) -> bool:
        with self._lock:
            proc = self.procs.get(eval_id)
        if proc is not None:
            return proc.poll() is None
        return bool(job.get("pid")) and _pid_is_job(int(job["pid"]), job_dir)

    def status(self, run_id: str, eval_id: str, with_result: bool = True) -> dict[str, Any]:
        """Everything the API reports about one evaluation, read from its folder."""
        job_dir = self.job_dir(run_id, eval_id)
        result_path = job_dir / RESULT_FILE
        result = json.loads(result_path.read_text()) if result_path.is_file() else None
        job_path = job_dir / JOB_FILE
        job = json.loads(job_path.read_text()) if job_path.is_file() else {}
        out: dict[str, Any] = {
            "id": eval_id,
            "run_id": run_id,
            "data": job.get("data", (result or {}).get("data")),
            "vs": job.get("vs_id", (result or {}).get("vs_id")),
            "created_at": job.get("created_at", (result or {}).get("created_at")),
            "status": "running",
            "stage": None,
            "progress": 0.0,
            "error": None,
            "verdict": None,
            "result": None,
        }
        records = _read_progress(job_dir / PROGRESS_FILE)
        plan = _plan(job)
        for rec in records:
            if rec.get("type") == "progress":
                stage = rec["stage"]
                if stage not in plan:
                    plan.append(stage)
                done, total = rec.get("done", 0), max(rec.get("total", 1), 1)
                out["stage"] = stage
                out["progress"] = round(min((plan.index(stage) + min(done / total, 1)) / len(plan), 0.99), 4)
        failed = next((r for r in reversed(records) if r.get("type") == "failed"), None)
        if result is not None:
            out.update(status="completed", stage=None, progress=1.0, verdict=verdict(result))
            if with_result:
                out["result"] = result
        elif failed is not None:
            out.update(status="failed", error={k: failed.get(k) for k in ("code", "message", "hint")})
        elif not job or not self._alive(eval_id, job, job_dir):
            out["status"] = "failed"
            out["error"] = {
                "code": str(ErrorCode.RUNTIME_INTERNAL),
                "message": "The evaluation process exited without a result. Its log ends:\n"
                + _tail(job_dir / LOG_FILE),
                "hint": "Start the evaluation again; .job.log in its folder has the details.",
            }
        return out

    def list_for_run(self, run_id: str) -> list[dict[str, Any]]:
        """Every evaluation of a run (API jobs and `backprop eval` results), oldest first, without results."""
        folder = self.runs_dir / run_id / "evals"
        found = (
            [p for p in folder.iterdir() if p.is_dir() and EVAL_ID.match(p.name)] if folder.is_dir() else []
        )
        found.sort(key=lambda p: p.stat().st_mtime)
        return [self.status(run_id, p.name, with_result=False) for p in found]


def verdict(result: dict[str, Any]) -> str | None:
    """The verdict line of a comparison (None without one); the CLI prints the same line."""
    diff = result.get("diff")
    if not diff:
        return None
    better = [k for k, d in diff.items() if d["excludes_zero"] and d["verdict"] == "better"]
    worse = [k for k, d in diff.items() if d["excludes_zero"] and d["verdict"] == "worse"]
    other = result.get("vs_id")
    if better and not worse:
        return f"better than {other} on {', '.join(better)}"
    if worse and not better:
        return f"worse than {other} on {', '.join(worse)}"
    if better and worse:
        return f"mixed: better on {', '.join(better)}, worse on {', '.join(worse)} than {other}"
    return f"no difference from {other} that this many examples can show"
