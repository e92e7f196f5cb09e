"""Browser input reaching Reflex event handlers meets the same path policy as the API."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.settings import Settings


def _state_classes() -> list[type]:
    import reflex as rx

    import ui_app.pages
    import ui_app.state

    for pkg in (ui_app.pages, ui_app.state):
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")

    def subclasses(cls: type) -> list[type]:
        out = []
        for sub in cls.__subclasses__():
            out += [sub, *subclasses(sub)]
        return out

    return [c for c in subclasses(rx.State) if c.__module__.startswith("ui_app")]


def test_every_handler_with_parameters_is_in_the_registry() -> None:
    from ui_app.state.handlers import HANDLER_POLICIES

    found = set()
    for cls in _state_classes():
        for name, handler in cls.event_handlers.items():
            params = [p for p in inspect.signature(handler.fn).parameters if p != "self"]
            if params:
                found.add(f"{cls.__name__}.{name}")
    missing = sorted(found - set(HANDLER_POLICIES))
    assert not missing, f"event handlers taking browser input with no listed policy: {missing}"
    assert "NewRunState.pick_example" in found


@pytest.fixture
def service(tmp_path: Path) -> Any:
    from ui_app.state import service as ui_service

    settings = Settings(home=tmp_path / "home", server={"max_upload_mb": 1})
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    store = SimpleNamespace(find_dataset=lambda _value: None)
    ui_service.use_service(SimpleNamespace(settings=settings, store=store))
    yield ui_service
    ui_service.use_service(None)


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../etc/passwd", "examples/../../etc/hostname"])
def test_example_path_outside_the_bases_is_refused(service: Any, path: str) -> None:
    with pytest.raises(BackpropError) as err:
        service.example_path(path)
    assert err.value.code == ErrorCode.INPUT_PATH_TRAVERSAL


def test_example_path_inside_examples_is_allowed(service: Any) -> None:
    files = service.example_files()
    if not files:
        pytest.skip("no example files in this checkout")
    assert service.example_path(files[0]) == str(Path(files[0]).resolve())


def test_validate_refuses_a_system_file(service: Any) -> None:
    with pytest.raises(BackpropError) as err:
        asyncio.run(service.validate("/etc/passwd", model="demo", max_seq_len=128))
    assert err.value.code == ErrorCode.INPUT_PATH_TRAVERSAL


def test_pick_example_event_gives_no_preview(service: Any) -> None:
    from ui_app.pages.new_run import NewRunState

    state = SimpleNamespace(report={}, preview=[], histogram=[], errors=[], values={}, data_label="", busy=False)
    state._check = lambda *a: pytest.fail("the data check ran on a refused path")  # noqa: ARG005

    async def drive() -> None:
        async for _ in NewRunState.pick_example.fn(state, "/etc/passwd"):
            pass

    asyncio.run(drive())
    assert state.report == {} and state.preview == []
    assert "INPUT_PATH_TRAVERSAL" in state.errors[0]["message"]


@pytest.mark.parametrize("run_id", ["../x", "..", "a/b", "~root", "a\\b"])
def test_run_dir_refuses_ids_that_leave_runs_dir(service: Any, run_id: str) -> None:
    with pytest.raises(BackpropError):
        service.run_dir(run_id)


def test_web_upload_is_copied_in_chunks_under_the_limit(service: Any, tmp_path: Path) -> None:
    import io

    from backpropagate.runs.uploads import upload_limit

    settings = service.run_service().settings
    big = upload_limit(settings) + 1
    with pytest.raises(BackpropError) as err:
        asyncio.run(service.save_upload("big.jsonl", io.BytesIO(b""), size=big))
    assert err.value.code == ErrorCode.INPUT_UPLOAD_TOO_LARGE

    class Endless(io.RawIOBase):
        def read(self, n: int = -1) -> bytes:
            return b"x" * (n if n > 0 else 1 << 20)

    with pytest.raises(BackpropError) as err:
        asyncio.run(service.save_upload("big.jsonl", Endless()))
    assert err.value.code == ErrorCode.INPUT_UPLOAD_TOO_LARGE
    assert not any(settings.datasets_dir.iterdir())
