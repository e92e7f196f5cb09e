"""Upload an export folder (or file) to the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from backpropagate.errors import BackpropError, ErrorCode


def hub_token() -> str | None:
    """HF_TOKEN, else the token saved by `huggingface-cli login`."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no saved login is the same as no token
        return None


def push(path: str | Path, repo: str, private: bool = True) -> str:
    """Create ``repo`` (if needed) and upload ``path``; returns the repo URL."""
    path = Path(path)
    if not path.exists():
        raise BackpropError(ErrorCode.STATE_NOT_FOUND, f"{path} does not exist: nothing to push")
    if "/" not in repo:
        raise BackpropError(ErrorCode.CONFIG_INVALID_SETTING, f"--repo must be user/name; got {repo!r}")
    token = hub_token()
    if not token:
        raise BackpropError(
            ErrorCode.DEP_HUB_PUSH_FAILED,
            f"no Hugging Face token: cannot push {path.name} to {repo}",
            retryable=False,
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        if path.is_dir():
            api.upload_folder(repo_id=repo, folder_path=str(path), ignore_patterns=[".work/*"])
        else:
            api.upload_file(repo_id=repo, path_or_fileobj=str(path), path_in_repo=path.name)
    except Exception as exc:  # noqa: BLE001 - network, auth and quota errors all mean "push failed"
        raise BackpropError(ErrorCode.DEP_HUB_PUSH_FAILED, f"pushing {path} to {repo} failed: {exc}") from exc
    return str(url)
