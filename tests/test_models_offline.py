"""Offline model lookups: a hub id comes from the local cache or fails at once with a code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.models.demo import resolve_model
from backpropagate.settings import get_settings


def _cache(root: Path, repo: str) -> Path:
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    return snapshot


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BACKPROPAGATE_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    get_settings.cache_clear()
    yield tmp_path / "hub"
    get_settings.cache_clear()


def test_offline_hub_id_resolves_to_its_cached_snapshot(offline_cache: Path) -> None:
    import huggingface_hub.constants as hub

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub, "HF_HUB_CACHE", str(offline_cache))  # read at import: point this process's copy
        snapshot = _cache(offline_cache, "org/tiny")
        assert Path(resolve_model("org/tiny")) == snapshot
        with pytest.raises(BackpropError) as err:
            resolve_model("org/absent")
    assert err.value.code == ErrorCode.DEP_MODEL_LOAD_FAILED
    assert "local cache" in err.value.message and "BACKPROPAGATE_OFFLINE" in err.value.message
    assert "huggingface-cli download org/absent" in err.value.hint


def test_loaders_get_the_cached_snapshot_and_folders_stay_folders(
    offline_cache: Path, tmp_path: Path
) -> None:
    """The training loader and the data validator resolve through the same lookup."""
    import huggingface_hub.constants as hub

    from backpropagate.training.backends import resolve_model_path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub, "HF_HUB_CACHE", str(offline_cache))
        snapshot = _cache(offline_cache, "org/other")
        assert Path(resolve_model_path("org/other")) == snapshot
        with pytest.raises(BackpropError) as err:
            resolve_model_path("org/missing")
        assert err.value.code == ErrorCode.DEP_MODEL_LOAD_FAILED
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == str(folder.resolve())
    assert resolve_model("./no/such/folder") == "./no/such/folder"  # the loader names it a missing folder
