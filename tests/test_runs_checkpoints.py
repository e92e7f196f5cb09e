"""`backprop runs checkpoints RUN_ID`: the checkpoints on disk, not the store's possibly stale rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sqlmodel import Session

from backpropagate.cli.runs import disk_checkpoints
from backpropagate.runs.store import CheckpointRow, Run, open_store

RUN = "20260101-000000-ck01"


def _checkpoint(root: Path, step: int, eval_loss: float | None, *, complete: bool = True) -> Path:
    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "trainable.safetensors").write_bytes(b"x" * 100)
    if complete:
        meta = {"step": step, "eval_loss": eval_loss, "files": {"trainable.safetensors": {"bytes": 100}}}
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_lists_what_is_on_disk_and_marks_the_best(isolated_home: Path) -> None:
    store = open_store()
    store.add_run(Run(id=RUN, status="interrupted"))
    root = isolated_home / "runs" / RUN / "checkpoints"
    # Step 2 was pruned after its row was written; step 6 was written just before a kill and
    # never folded into the store; step 8 is half-written; step 10's folder has no meta yet.
    with Session(store.engine) as s:
        for step in (2, 4):
            s.add(CheckpointRow(run_id=RUN, step=step, path=str(root / f"step-{step:06d}"), bytes=1))
        s.commit()
    _checkpoint(root, 4, 1.5)
    _checkpoint(root, 6, 1.2)
    (root / "step-000008.partial").mkdir()
    _checkpoint(root, 10, None, complete=False)
    rows = disk_checkpoints(RUN)
    assert [r["step"] for r in rows] == [4, 6]
    assert [r["best"] for r in rows] == [False, True]
    assert rows[0]["bytes"] == 100 and rows[1]["path"] == str((root / "step-000006").resolve())

    env = {**os.environ, "BACKPROPAGATE_HOME": str(isolated_home), "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-m", "backpropagate", "runs", "checkpoints", RUN, "--json"],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert [r["step"] for r in json.loads(out.stdout)] == [4, 6]
    table = subprocess.run([sys.executable, "-m", "backpropagate", "runs", "checkpoints", RUN],
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert table.returncode == 0 and "step-000006" in table.stdout and "yes" in table.stdout
