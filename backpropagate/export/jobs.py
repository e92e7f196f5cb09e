"""Export jobs and model servers, the server side of exports: each job runs in its own subprocess
(``export/job.py``, the job itself).

A job lives in ``runs/<run_id>/exports/<export_id>/``: ``.job.json`` (the request), ``.progress.jsonl``
(JSON lines the job appends) and ``.job.log``; everything else in the folder is the export's output.
The state of a job is read back from those files, so it survives a server restart. GGUF exports can
be served by ``llama_cpp.server`` on a loopback port, one server per export. A run's base model (no
adapter) is exported the same way, once per quantization, to chat with next to the trained model.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export.job import JOB_FILE, LOG_FILE, PROGRESS_FILE
from backpropagate.logs import get_logger
from backpropagate.runs.store import Run, Store
from backpropagate.settings import Settings

log = get_logger(__name__)

JOB_MODULE = "backpropagate.export.job"
# Completed runs export their adapter; stopped and interrupted ones their newest checkpoint.
EXPORTABLE_STATUSES = frozenset({"completed", "cancelled", "interrupted"})
DIRECT_GGUF = frozenset({"f32", "f16", "bf16", "q8_0"})  # written by the converter, no quantize stage
EXPORT_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,80}$")
SERVER_READY_S = 120.0


def _plan(job: dict[str, Any]) -> list[str]:
    """The stages a job reports, in order, to turn (stage, done, total) into one fraction."""
    fmt = job["format"]
    if fmt == "adapter":
        return ["adapter"]
    if fmt == "merged":
        return ["merge"]
    stages = ["merge", "convert"]
    if job.get("quantization") not in DIRECT_GGUF:
        stages.append("quantize")
    if job.get("verify"):
        stages.append("verify")
    if job.get("ollama_name"):
        stages.append("ollama")
    return stages


def check_request(fmt: str, quantization: str | None) -> str | None:
    """Refuse a format/quantization pair before any process starts; returns the quantization used."""
    if fmt == "adapter":
        return None
    q = (quantization or "f16").lower()
    if fmt == "merged":
        allowed: tuple[str, ...] = ("f32", "f16", "bf16")
    else:
        from backpropagate.export.quantize import QUANTIZATIONS  # numpy only, never torch

        allowed = tuple(QUANTIZATIONS)
    if q not in allowed:
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"quantization {q!r} is not available for {fmt} exports; choose one of {', '.join(allowed)}",
        )
    return q


def weights_source(run: Run, run_dir: Path) -> Path | None:
    """What the export job resolves (``export/source.py``, the resolver ``backprop export`` uses too):
    the run folder (or its output_dir) holding trained weights, the run folder when it has only a
    complete checkpoint, else None. No torch here."""
    from backpropagate.export.checkpoint import last_checkpoint

    # LoRA runs leave adapter/adapter_config.json; full fine-tuning a whole model (config.json).
    marks = ("adapter/adapter_config.json", "adapter/config.json", "model/config.json")
    if any((run_dir / mark).is_file() for mark in marks):
        return run_dir
    output_dir = (run.config or {}).get("output_dir")
    if output_dir:
        out = Path(output_dir).expanduser()
        if (out / "adapter_config.json").is_file() or (out / "config.json").is_file():
            return out
    if last_checkpoint(run_dir) is not None:  # stopped before the end: its newest checkpoint
        return run_dir
    return None


def _read_progress(path: Path) -> list[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for line in raw.split(b"\n"):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line still being written
    return records


def _pid_is_job(pid: int, job_dir: Path) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return JOB_MODULE in args and str(job_dir) in args


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class ModelServer:
    export_id: str
    proc: subprocess.Popen[bytes]
    base_url: str


class ExportJobs:
    """Starts export jobs, reads their state, and runs model servers for GGUF exports."""

    def __init__(self, settings: Settings, command: list[str] | None = None) -> None:
        self.settings = settings
        self.runs_dir = settings.runs_dir.resolve()
        self.command = command or [sys.executable, "-m", JOB_MODULE]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.dirs: dict[str, Path] = {}
        self.servers: dict[str, ModelServer] = {}
        self._lock = threading.Lock()
        self._serve_lock = threading.Lock()  # two requests must not start two servers
        self._start_lock = threading.Lock()  # two requests must not start two base exports

    # Jobs ---------------------------------------------------------------------
    def start(
        self,
        run: Run,
        fmt: str,
        quantization: str | None,
        verify: bool = True,
        ollama_name: str | None = None,
        base_model: bool = False,
    ) -> dict[str, Any]:
        """Check the run can be exported, write the job folder and start its process.

        With ``base_model`` the model the run started from is exported instead (GGUF only); a
        running or completed base export of the same run and quantization is returned, not redone.
        """
        run_dir = self.runs_dir / run.id
        if run.status not in EXPORTABLE_STATUSES:
            if run.status in ("queued", "running", "paused"):
                raise BackpropError(
                    ErrorCode.STATE_RUN_ACTIVE,
                    f"Run {run.id} is {run.status}; wait for it to complete or stop it before exporting.",
                )
            raise BackpropError(
                ErrorCode.STATE_RUN_NOT_EXPORTABLE,
                f"Run {run.id} is {run.status}; only completed or stopped (cancelled) runs are exported.",
            )
        source = weights_source(run, run_dir)
        if source is None:
            raise BackpropError(
                ErrorCode.STATE_RUN_NOT_EXPORTABLE,
                f"Run {run.id} is {run.status} but has no adapter and no complete checkpoint yet.",
                hint="Resume it until it writes a checkpoint (every save_every steps), then export.",
            )
        q = check_request(fmt, quantization)
        if ollama_name and fmt != "gguf":
            raise BackpropError(
                ErrorCode.CONFIG_INVALID_SETTING, "ollama_name needs a gguf export; got format " + repr(fmt)
            )
        if base_model:
            from backpropagate.export.run_export import check_base_model_format  # no torch

            check_base_model_format(fmt)
            # The base never changes, so one export per quantization serves every later request.
            with self._start_lock:
                reuse = self._reusable_base(run.id, q, verify, ollama_name)
                if reuse is not None:
                    return reuse
                return self._launch(run, source, fmt, q, verify, ollama_name, base_model)
        return self._launch(run, source, fmt, q, verify, ollama_name, base_model)

    def _reusable_base(
        self, run_id: str, q: str | None, verify: bool, ollama_name: str | None
    ) -> dict[str, Any] | None:
        for state in reversed(self.list_for_run(run_id)):  # newest first
            if not state["base_model"] or state["quantization"] != q or state["status"] == "failed":
                continue
            if ollama_name and state["ollama_name"] != ollama_name:
                continue  # registration asked for under a new name: do it
            if verify and not state["verify"]:
                continue  # a verified one was asked for
            return state
        return None

    def _launch(
        self,
        run: Run,
        source: Path,
        fmt: str,
        q: str | None,
        verify: bool,
        ollama_name: str | None,
        base_model: bool,
    ) -> dict[str, Any]:
        from backpropagate.export.run_export import export_label  # no torch: safe in the server

        run_dir = self.runs_dir / run.id
        export_id = f"{export_label(fmt, q, base_model)}-{secrets.token_hex(4)}"
        job_dir = run_dir / "exports" / export_id
        job_dir.mkdir(parents=True)
        job = {
            "id": export_id,
            "run_id": run.id,
            "source": str(source),
            "format": fmt,
            "quantization": q,
            "verify": verify,
            "ollama_name": ollama_name,
            "base_model": base_model,
            "created_at": time.time(),
        }  # never the database URL: it may hold a password, and the job reads it from the environment
        (job_dir / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")
        env = {
            **os.environ,
            "BACKPROPAGATE_HOME": str(self.settings.home),
            "BACKPROPAGATE_DB_URL": self.settings.database_url,
            "PYTHONUNBUFFERED": "1",
        }
        with (job_dir / LOG_FILE).open("ab") as out:
            proc = subprocess.Popen(
                [*self.command, str(job_dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=job_dir,
                start_new_session=True,  # a signal to the server does not stop the export
            )
        job["pid"] = proc.pid
        (job_dir / JOB_FILE).write_text(json.dumps(job, indent=2) + "\n")
        with self._lock:
            self.procs[export_id] = proc
            self.dirs[export_id] = job_dir
        log.info("started export %s of run %s (pid %d)", export_id, run.id, proc.pid)
        return self.status(export_id)

    def job_dir(self, export_id: str) -> Path:
        """The folder of an export; STATE_NOT_FOUND for unknown or malformed ids."""
        if not EXPORT_ID.match(export_id) or ".." in export_id:
            raise BackpropError(ErrorCode.STATE_NOT_FOUND, f"No export with id {export_id!r}.")
        with self._lock:
            known = self.dirs.get(export_id)
        if known is not None and (known / JOB_FILE).is_file():
            return known
        for job_file in self.runs_dir.glob(f"*/exports/{export_id}/{JOB_FILE}"):
            with self._lock:
                self.dirs[export_id] = job_file.parent
            return job_file.parent
        raise BackpropError(ErrorCode.STATE_NOT_FOUND, f"No export with id {export_id!r}.")

    def _alive(self, export_id: str, job: dict[str, Any], job_dir: Path) -> bool:
        with self._lock:
            proc = self.procs.get(export_id)
        if proc is not None:
            return proc.poll() is None
        return bool(job.get("pid")) and _pid_is_job(int(job["pid"]), job_dir)

    def status(self, export_id: str) -> dict[str, Any]:
        """Everything the API reports about one export, read from its folder."""
        job_dir = self.job_dir(export_id)
        job = json.loads((job_dir / JOB_FILE).read_text())
        records = _read_progress(job_dir / PROGRESS_FILE)
        plan = _plan(job)
        stage, fraction = None, 0.0
        for rec in records:
            if rec.get("type") == "progress":
                stage = rec["stage"]
                if stage not in plan:
                    plan.append(stage)
                done, total = rec.get("done", 0), max(rec.get("total", 1), 1)
                fraction = (plan.index(stage) + min(done / total, 1.0)) / len(plan)
        fraction = min(fraction, 0.99)  # 1.0 only once the result is written
        final = next((r for r in reversed(records) if r.get("type") in ("completed", "failed")), None)
        out: dict[str, Any] = {
            "id": export_id,
            "run_id": job["run_id"],
            "format": job["format"],
            "quantization": job.get("quantization"),
            "verify": job.get("verify", True),
            "ollama_name": job.get("ollama_name"),
            "base_model": bool(job.get("base_model")),
            "created_at": job["created_at"],
            "ended_at": None,
            "status": "running",
            "stage": stage,
            "progress": round(fraction, 4),
            "files": [],
            "path": None,
            "seconds": None,
            "verification": None,
            "warnings": [],
            "error": None,
            "base_url": self._serving(export_id),
        }
        if final is None:
            if not self._alive(export_id, job, job_dir):
                out["status"] = "failed"
                out["error"] = {
                    "code": str(ErrorCode.RUNTIME_INTERNAL),
                    "message": "The export process exited without a result. Its log ends:\n"
                    + _tail(job_dir / LOG_FILE),
                    "hint": "Start the export again; .job.log in the export folder has the details.",
                    "details": {},
                }
            return out
        out["ended_at"] = final.get("ts")
        if final["type"] == "completed":
            result = final["result"]
            out.update(
                status="completed",
                progress=1.0,
                stage=None,
                path=result.get("path"),
                seconds=result.get("seconds"),
                verification=result.get("verification"),
                warnings=result.get("warnings", []),
                files=self._files(job_dir),
            )
        else:
            details = final.get("details") or {}
            out.update(
                status="failed",
                files=self._files(job_dir),
                verification=details.get("report"),
                error={k: final.get(k) for k in ("code", "message", "hint")} | {"details": details},
            )
        return out

    def list_for_run(self, run_id: str) -> list[dict[str, Any]]:
        folder = self.runs_dir / run_id / "exports"
        jobs = sorted(folder.glob(f"*/{JOB_FILE}"), key=lambda p: p.stat().st_mtime)
        return [self.status(p.parent.name) for p in jobs if EXPORT_ID.match(p.parent.name)]

    @staticmethod
    def _files(job_dir: Path) -> list[dict[str, Any]]:
        return [
            {"name": p.name, "bytes": p.stat().st_size}
            for p in sorted(job_dir.iterdir())
            if p.is_file() and not p.name.startswith(".")
        ]

    def file_path(self, export_id: str, name: str) -> Path:
        """A produced file of the export by name; anything that is not one of them is refused."""
        job_dir = self.job_dir(export_id).resolve()
        candidate = (job_dir / name).resolve()
        if "/" in name or "\\" in name or name in ("", ".", "..") or candidate.parent != job_dir:
            raise BackpropError(
                ErrorCode.INPUT_PATH_TRAVERSAL,
                f"file must be the name of one of export {export_id}'s files, not a path; got {name!r}",
            )
        if name not in {f["name"] for f in self._files(job_dir)}:
            raise BackpropError(ErrorCode.STATE_NOT_FOUND, f"Export {export_id} has no file {name!r}.")
        return candidate

    def delete(self, export_id: str, store: Store) -> None:
        """Stop the export's job and model server if running, then remove its folder and record."""
        job_dir = self.job_dir(export_id)
        job = json.loads((job_dir / JOB_FILE).read_text())
        self.stop_server(export_id)
        with self._lock:
            proc = self.procs.pop(export_id, None)
            self.dirs.pop(export_id, None)
        if proc is not None:
            _stop(proc)
        elif job.get("pid") and _pid_is_job(int(job["pid"]), job_dir):
            _kill_group(int(job["pid"]), job_dir)
        store.delete_exports(job["run_id"], str(job_dir))
        shutil.rmtree(job_dir, ignore_errors=True)
        log.info("deleted export %s of run %s", export_id, job["run_id"])

    # Model servers --------------------------------------------------------------
    def _serving(self, export_id: str) -> str | None:
        with self._lock:
            server = self.servers.get(export_id)
        if server is not None and server.proc.poll() is None:
            return server.base_url
        return None

    def serve(self, export_id: str) -> str:
        """Start (or reuse) llama_cpp.server for a completed GGUF export; returns its base URL."""
        state = self.status(export_id)
        gguf = state.get("path") or ""
        if state["status"] != "completed" or not gguf.endswith(".gguf"):
            raise BackpropError(
                ErrorCode.STATE_NOT_FOUND,
                f"Export {export_id} is {state['status']} ({state['format']}); only a completed GGUF "
                "export can be served.",
                hint="Export the run with format gguf and wait for it to complete.",
            )
        with self._serve_lock:
            with self._lock:
                server = self.servers.get(export_id)
            if server is not None and server.proc.poll() is None:
                return server.base_url
            return self._start_server(export_id, Path(gguf))

    def _start_server(self, export_id: str, gguf: Path) -> str:
        from backpropagate.export.serve import check_server_extra, free_port, serve_command, wait_ready

        check_server_extra()
        port = free_port()
        job_dir = self.job_dir(export_id)
        with (job_dir / ".serve.log").open("ab") as out:
            proc = subprocess.Popen(
                serve_command(gguf, port),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base_url, SERVER_READY_S, proc)
        except BackpropError as err:
            _stop(proc)
            err.message += "\n" + _tail(job_dir / ".serve.log")
            raise
        with self._lock:
            self.servers[export_id] = ModelServer(export_id, proc, base_url)
        log.info("serving export %s at %s (pid %d)", export_id, base_url, proc.pid)
        return base_url

    def stop_server(self, export_id: str) -> bool:
        """Stop the export's model server; False when none was running."""
        with self._lock:
            server = self.servers.pop(export_id, None)
        if server is None:
            return False
        _stop(server.proc)
        return True

    def close(self) -> None:
        """Stop every model server (export jobs run on; their folders keep their state)."""
        for export_id in list(self.servers):
            self.stop_server(export_id)


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def _kill_group(pid: int, job_dir: Path, grace_s: float = 10.0) -> None:
    # A job started by an earlier server: no Popen to wait on, so watch /proc instead.
    try:
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _pid_is_job(pid, job_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_is_job(pid, job_dir):
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
