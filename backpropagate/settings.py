"""Process-wide settings, read from the environment (prefix ``BACKPROPAGATE_``, nesting ``__``).

Per-run hyperparameters live in :class:`backpropagate.config.RunConfig`, not here.
Every field is documented in docs/configuration.md; a test fails when one is missing.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseModel):
    """The web app and API server."""

    host: str = Field(
        "127.0.0.1",
        description="Interface `backprop ui` and `backprop serve-api` bind when --host is not given.",
    )
    port: int = Field(
        7860,
        ge=1,
        le=65535,
        description="Port `backprop ui` uses when --port is not given; `backprop serve-api` too once this is set "
        "(else 8000).",
    )
    max_upload_mb: int = Field(200, ge=1, description="Largest data set upload accepted, in MB.")
    session_hours: float = Field(12.0, gt=0, description="How long a login session lasts.")
    max_request_kb: int = Field(
        1024, ge=1, description="Largest request body accepted other than a file upload, in KB."
    )
    trusted_proxies: str = Field(
        "",
        description="Comma-separated addresses or networks (10.0.0.0/8) of reverse proxies whose "
        "X-Forwarded-For is believed; empty: none.",
    )
    max_concurrent_runs: int = Field(
        1, ge=1, description="Runs allowed to train at once on CPU (GPU runs take one GPU each)."
    )


class Settings(BaseSettings):
    """Settings for every process (CLI, server, worker)."""

    model_config = SettingsConfigDict(env_prefix="BACKPROPAGATE_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(
        Path.home() / ".backpropagate",
        description="Folder holding the database, runs, uploads, demo models and exports.",
    )
    db_url: str | None = Field(
        None, description="SQLAlchemy URL of the run store; default SQLite file under home."
    )
    log_level: str = Field("INFO", description="Logging level (DEBUG, INFO, WARNING, ERROR).")
    log_json: bool = Field(False, description="Write log lines as JSON objects instead of text.")
    offline: bool = Field(
        False, description="Never reach the Hugging Face Hub (also implied by HF_HUB_OFFLINE=1)."
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    dist_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto",
        description="Collective backend of multi-process runs: `auto` is NCCL on GPUs, gloo on CPU. "
        "Testing switch: `gloo` trains a `gpus: N` run as N CPU ranks on a machine without GPUs "
        "(docs/scaling.md).",
    )
    fake_gpus: int = Field(
        0,
        ge=0,
        le=64,
        description="Testing switch: the scheduler and `backprop info` see this many pretend GPUs "
        "(no telemetry, nothing runs on them); pair with `dist_backend=gloo`. Never set it in production.",
    )

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'backprop.db'}"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def exports_dir(self) -> Path:
        return self.home / "exports"

    def ensure_dirs(self) -> None:
        """Create the home and its folders private to this user (0700); tighten a home we created."""
        for path in (self.home, self.runs_dir, self.datasets_dir, self.models_dir, self.exports_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
                path.chmod(0o700)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process (read once; call ``get_settings.cache_clear()`` in tests)."""
    return Settings()
