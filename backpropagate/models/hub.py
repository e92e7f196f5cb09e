"""Hub model ids while offline: the local cache or a coded error at once, never the network.

``BACKPROPAGATE_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) means no request to the Hugging Face Hub.
transformers alone would retry a hub id for most of a minute before failing when only our own
switch is set, so a hub id is looked up in the cache here first: found, its snapshot folder is
loaded like any local model; missing, DEP_MODEL_LOAD_FAILED says so straight away.
"""

from __future__ import annotations

import os

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.settings import get_settings

_TRUE = ("1", "true", "yes", "on")


def is_offline() -> bool:
    """Whether this process must not reach the hub (our setting or the hub's own switch)."""
    return get_settings().offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cached_snapshot(repo_id: str) -> str:
    """The local snapshot folder of hub model ``repo_id``, or DEP_MODEL_LOAD_FAILED without a request."""
    # Set before the first hub call of this process, so transformers (which reads it) stays local too.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError) as exc:
        raise BackpropError(
            ErrorCode.DEP_MODEL_LOAD_FAILED,
            f"'{repo_id}' is not a local folder and is not in the local cache, and the hub is off "
            "(offline: BACKPROPAGATE_OFFLINE or HF_HUB_OFFLINE is set).",
            hint=f"Download it once while online (`huggingface-cli download {repo_id}`), unset "
            "BACKPROPAGATE_OFFLINE and HF_HUB_OFFLINE, or use a local folder or `demo`.",
            model=repo_id,
            cause=type(exc).__name__,
        ) from None
