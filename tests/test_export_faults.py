"""Exports that are killed, stopped or fail: what is left on disk and what the doors answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_export_support import qwen2_run  # noqa: F401 - fixture

BACKPROP = [sys.executable, "-m", "backpropagate"]


def _leftovers(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return [p for p in out.iterdir() if p.name == ".work" or p.name.endswith(".partial")]


def test_a_killed_gguf_export_leaves_no_file_under_its_final_name(qwen2_run: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "gguf"
    cmd = [*BACKPROP, "export", qwen2_run.name, "--format", "gguf", "-q", "f16", "-o", str(out), "--no-verify"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.gguf.partial")):  # killed while the GGUF is being written
            assert proc.poll() is None, "the export finished before it could be killed"
            assert time.monotonic() < deadline, "no .partial file appeared"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not list(out.glob("*.gguf")), "a killed export must not leave a file under a .gguf name"
    assert (out / ".work").is_dir(), "the kill left scratch for the next export to clear"

    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    gguf = Path(result["path"])
    assert gguf.suffix == ".gguf" and gguf.is_file()
    assert gguf.read_bytes()[:4] == b"GGUF"
    assert _leftovers(out) == [], "the second export cleans the first one's scratch and its own"
