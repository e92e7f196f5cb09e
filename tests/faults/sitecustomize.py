"""A full disk, injected into a real worker: put this folder on PYTHONPATH.

With ``BACKPROPAGATE_TEST_ENOSPC_RUN_NAME=NAME`` and ``BACKPROPAGATE_TEST_ENOSPC_CHECKPOINT=N``,
the N-th checkpoint weights write of the run called NAME fails exactly as safetensors fails on a
full disk (``... No space left on device (os error 28)``), leaving a torn file behind as a real
full disk does. It fires once per run (``RUN_DIR/enospc-injected`` marks it), so the resumed
worker writes its checkpoints normally. Other runs, and processes without the variables, are
untouched.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
from pathlib import Path

_NAME = os.environ.get("BACKPROPAGATE_TEST_ENOSPC_RUN_NAME")
_AT = int(os.environ.get("BACKPROPAGATE_TEST_ENOSPC_CHECKPOINT") or 0)
MARK = "enospc-injected"


class _WrapSafetensors(importlib.abc.MetaPathFinder):
    """When safetensors.torch is first imported, wrap its save_file."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        if name != "safetensors.torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            run_module(module)
            module.save_file = _failing(module.save_file)

        spec.loader.exec_module = exec_module
        return spec


def _run_dir(target: Path) -> Path | None:
    parts = target.parts
    if "checkpoints" not in parts:
        return None
    return Path(*parts[: parts.index("checkpoints")])


def _failing(save_file):  # noqa: ANN001, ANN202
    writes = {"n": 0}

    def wrapped(tensors, filename, *args, **kwargs):  # noqa: ANN001, ANN202
        target = Path(str(filename))
        run_dir = _run_dir(target)
        if run_dir is not None and not (run_dir / MARK).exists():
            try:
                name = json.loads((run_dir / "config.json").read_text()).get("name")
            except (OSError, ValueError):
                name = None
            if name == _NAME:
                writes["n"] += 1
                if writes["n"] == _AT:
                    from safetensors import SafetensorError

                    (run_dir / MARK).write_text(f"{target}\n")
                    target.write_bytes(b"\0" * 100)  # torn, as when the disk filled up mid-write
                    raise SafetensorError(
                        "Error while serializing: I/O error: No space left on device (os error 28)"
                    )
        return save_file(tensors, filename, *args, **kwargs)

    return wrapped


if _NAME and _AT:
    sys.meta_path.insert(0, _WrapSafetensors())
