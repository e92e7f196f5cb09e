"""A full disk is RUNTIME_DISK_FULL with the path and the free space, whatever raised it: Python's
ENOSPC, safetensors' "os error 28", torch's "unexpected pos" on a nearly full disk; at the upload
door (nothing kept) and in an export job. A run's checkpoint on a full disk: tests/test_run_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors import SafetensorError

from backpropagate.errors import ErrorCode, disk_full_error
from backpropagate.settings import Settings


def test_each_shape_of_a_full_disk_is_disk_full(tmp_path: Path) -> None:
    err = disk_full_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a.bin")))
    assert err is not None and err.code == ErrorCode.RUNTIME_DISK_FULL and err.retryable
    assert str(tmp_path / "a.bin") in err.message and "MB free" in err.message
    assert err.details["free_bytes"] > 0 and err.http_status == 507
    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    err = disk_full_error(rust, tmp_path)
    assert err is not None and str(tmp_path) in err.message
    try:  # the cause of another exception still counts
        try:
            raise rust
        except SafetensorError as exc:
            raise RuntimeError("checkpoint failed") from exc
    except RuntimeError as wrapped:
        assert disk_full_error(wrapped, tmp_path) is not None
    # torch.save's message has no errno: only a nearly full disk makes it a full disk.
    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert disk_full_error(torn, tmp_path) is None  # this disk has room
    assert disk_full_error(RuntimeError("something else"), tmp_path) is None


def test_an_upload_on_a_full_disk_is_507_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backpropagate.runs import uploads
    from backpropagate.server.app import create_app

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd: int, mode: str) -> None:
            self.file = real_fdopen(fd, mode)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(uploads.os, "fdopen", FullDisk)
    settings = Settings(home=tmp_path / "home")
    with TestClient(create_app(settings, gpu_indices=[])) as client:
        resp = client.post("/api/datasets", files={"file": ("rows.jsonl", b'{"text": "hi"}\n' * 100)})
        assert resp.status_code == 507, resp.text
        body = resp.json()
        assert body["code"] == "RUNTIME_DISK_FULL" and str(settings.datasets_dir) in body["message"]
        assert client.get("/api/datasets").json() == []
    assert list(settings.datasets_dir.iterdir()) == []


def test_an_export_job_on_a_full_disk_records_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backpropagate.export import job, run_export

    def export_run(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(run_export, "export_run", export_run)
    job_dir = tmp_path / "exports" / "adapter-0000"
    job_dir.mkdir(parents=True)
    (job_dir / job.JOB_FILE).write_text(
        json.dumps({"id": "adapter-0000", "run_id": "r", "source": "r", "format": "adapter"})
    )
    assert job.run_job(job_dir) == 1
    records = [json.loads(line) for line in (job_dir / job.PROGRESS_FILE).read_text().splitlines()]
    failed = records[-1]
    assert failed["type"] == "failed" and failed["code"] == "RUNTIME_DISK_FULL"
    assert str(job_dir) in failed["message"] and "resume" in failed["hint"]
