"""Run one evaluation job in its own process: ``python -m backpropagate.evaluation.job JOB_DIR``.

``JOB_DIR`` is ``RUN_DIR/evals/<eval_id>/``. The job reads ``.job.json``, appends progress and
then the outcome as JSON lines to ``.progress.jsonl`` (the API server reads that file), and the
result itself lands in ``result.json`` beside them, as it does for ``backprop eval``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.export.job import JOB_FILE, PROGRESS_FILE, append_line


def run_job(job_dir: Path) -> int:
    """Do the evaluation described in ``job_dir``; returns the process exit code."""
    from backpropagate.evaluation.runner import evaluate_run

    job = json.loads((job_dir / JOB_FILE).read_text())
    progress_path = job_dir / PROGRESS_FILE

    def progress(stage: str, done: int, total: int) -> None:
        append_line(progress_path, {"type": "progress", "stage": stage, "done": done, "total": total})

    append_line(progress_path, {"type": "started", "pid": os.getpid()})
    try:
        result = evaluate_run(
            job["run_dir"],
            data=job.get("data"),
            vs=job.get("vs"),
            max_new_tokens=job.get("max_new_tokens", 64),
            seed=job.get("seed", 0),
            progress=progress,
            eval_id=job["id"],
        )
    except BackpropError as err:
        append_line(progress_path, {"type": "failed", **_error_record(err)})
        return 1
    except Exception as exc:  # noqa: BLE001 - any crash must still reach the API as a record
        traceback.print_exc()
        err = BackpropError(ErrorCode.RUNTIME_INTERNAL, f"evaluation failed: {type(exc).__name__}: {exc}")
        append_line(progress_path, {"type": "failed", **_error_record(err)})
        return 1
    append_line(progress_path, {"type": "completed", "seconds": result["seconds"]})
    return 0


def _error_record(err: BackpropError) -> dict[str, object]:
    return {"code": str(err.code), "message": err.message, "hint": err.hint, "details": err.details}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m backpropagate.evaluation.job JOB_DIR", file=sys.stderr)
        return 2
    from backpropagate.logs import configure_from_settings

    configure_from_settings("eval job")
    return run_job(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
