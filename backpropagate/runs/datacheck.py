"""The data check out of the server process: `backprop data validate --json` in a subprocess.

Counting tokens loads a tokenizer, which pulls in transformers (and may reach the hub); the server
process keeps those out, so the API's route and the web app's New run page both check here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode

CHECK_TIMEOUT_S = 600.0


async def check_data(
    path: str, model: str = "demo", max_seq_len: int = 1024, data_format: str = "auto", preview: int = 5
) -> dict[str, Any]:
    """The validation report of ``path`` as JSON (``ok`` says whether it can train); a problem
    before any report (a missing file, an unknown model) is raised with its code."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "backpropagate", "data", "validate", path, "--model", model,
        "--max-seq-len", str(max_seq_len), "--format", data_format, "--preview", str(preview), "--json",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHECK_TIMEOUT_S)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    try:
        return json.loads(out)
    except ValueError:
        text = err.decode(errors="replace")
        match = re.search(r"\[([A-Z_]+)\] (.*)", text)
        if match and match.group(1) in ErrorCode.__members__:
            raise BackpropError(match.group(1), match.group(2)) from None
        raise BackpropError(ErrorCode.RUNTIME_INTERNAL, f"The data checker failed: {text[-1000:]}") from None
