"""Shared test set-up: an isolated BACKPROPAGATE_HOME, offline hub, deterministic threads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before anything imports the package so that subprocesses inherit the same home.
os.environ.setdefault("BACKPROPAGATE_HOME", tempfile.mkdtemp(prefix="backprop-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from backpropagate.settings import get_settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def home() -> Path:
    """The test session's BACKPROPAGATE_HOME (shared: the demo models are built once)."""
    settings = get_settings()
    settings.ensure_dirs()
    return settings.home


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty BACKPROPAGATE_HOME for tests that must not see other tests' state."""
    monkeypatch.setenv("BACKPROPAGATE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run browser tests last.

    pytest-playwright's sync API keeps an event loop running in the main thread from its first
    use until the session ends; any later test that calls ``asyncio.run`` would fail.
    """
    items.sort(key=lambda item: "playwright" in getattr(item, "fixturenames", ()))
