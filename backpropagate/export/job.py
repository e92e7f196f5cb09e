"""Run one export job in its own process: ``python -m backpropagate.export.job JOB_DIR``.

Reads ``JOB_DIR/.job.json``, calls ``export_run`` and appends progress, then the result or the
error, as JSON lines to ``JOB_DIR/.progress.jsonl`` (the API server tails that file). A finished
export is recorded in the run store.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode, disk_full_error

JOB_FILE = ".job.json"
PROGRESS_FILE = ".progress.jsonl"
LOG_FILE = ".job.log"


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line in a single write, so a reader never sees half a record."""
    data = (json.dumps({"ts": time.time(), **record}, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _output_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_job(job_dir: Path) -> int:
    """Do the export described in ``job_dir``; returns the process exit code."""
    from backpropagate.export.run_export import export_label, export_run

    job = json.loads((job_dir / JOB_FILE).read_text())
    progress_path = job_dir / PROGRESS_FILE

    def progress(stage: str, done: int, total: int) -> None:
        append_line(progress_path, {"type": "progress", "stage": stage, "done": done, "total": total})

    append_line(progress_path, {"type": "started", "pid": os.getpid()})
    try:
        result = export_run(
            job["source"],
            job["format"],
            job.get("quantization"),
            output=job_dir,
            verify=job.get("verify", True),
            progress=progress,
            ollama_name=job.get("ollama_name"),
            base_model=job.get("base_model", False),
        )
    except BackpropError as err:
        append_line(progress_path, {"type": "failed", **_error_record(err)})
        return 1
    except Exception as exc:  # noqa: BLE001 - any crash must still reach the API as a record
        traceback.print_exc()
        err = disk_full_error(exc, job_dir) or BackpropError(
            ErrorCode.RUNTIME_INTERNAL, f"export failed: {type(exc).__name__}: {exc}"
        )
        append_line(progress_path, {"type": "failed", **_error_record(err)})
        return 1
    _record(job, export_label(result.format, result.quantization, result.base_model), Path(result.path))
    append_line(progress_path, {"type": "completed", "result": result.to_dict()})
    return 0


def _error_record(err: BackpropError) -> dict[str, Any]:
    return {"code": str(err.code), "message": err.message, "hint": err.hint, "details": err.details}


def _record(job: dict[str, Any], label: str, path: Path) -> None:
    # The store is a cache of what is on disk: a failure to record must not fail the export.
    try:
        from backpropagate.runs.store import ExportRow, open_store

        open_store().add_export(  # BACKPROPAGATE_DB_URL, set by the server that started the job
            ExportRow(run_id=job["run_id"], format=label, path=str(path), bytes=_output_bytes(path))
        )
    except Exception:  # noqa: BLE001
        traceback.print_exc()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m backpropagate.export.job JOB_DIR", file=sys.stderr)
        return 2
    from backpropagate.logs import configure_from_settings

    configure_from_settings("export job")
    return run_job(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
