"""The pages' one door to the run service, store, data validation and memory estimate.

The Reflex backend runs in the same process as the API, so the pages call the RunService
directly instead of making HTTP requests to their own server. Everything here returns plain
dicts and lists that Reflex can send to the browser; errors stay ``BackpropError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from backpropagate.errors import BackpropError, ErrorCode, disk_full_error
from backpropagate.events import EventBase, read_events
from backpropagate.settings import get_settings

if TYPE_CHECKING:
    from starlette.datastructures import State

    from backpropagate.runs.service import RunService


# Handed over by ui_app.py when the API's lifespan has started its RunService: the pages get the
# server's one service explicitly, typed, instead of looking for it inside the Reflex app.
_service: RunService | None = None
_api_state: State | None = None


def use_service(service: RunService | None, api_state: State | None = None) -> None:
    """Give the pages ``service`` (and the API app's state, which holds shared export jobs);
    ``None`` takes it back when the server stops."""
    global _service, _api_state
    _service, _api_state = service, api_state


def run_service() -> RunService:
    """The RunService of this server process."""
    if _service is None:
        raise BackpropError(
            ErrorCode.RUNTIME_INTERNAL,
            "The run service is not available in this process; start the web app with `backprop ui`.",
        )
    return _service


def api_state() -> State | None:
    """The API app's ``app.state`` when the pages run beside the API (export jobs are kept there)."""
    return _api_state


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    return dict(vars(obj))


# ---- runs ------------------------------------------------------------------------------------


async def list_runs(status: str | None = None) -> list[dict[str, Any]]:
    rows = await run_service().list([status] if status else None)
    return [_as_dict(r) for r in rows]


async def get_run(run_id: str) -> dict[str, Any]:
    return _as_dict(await run_service().get(run_id))


async def create_run(config: dict[str, Any]) -> str:
    """Queue a run; the config is checked by RunConfig (CONFIG_INVALID lists every problem)."""
    from backpropagate.config import RunConfig

    # RunService.submit applies the same path and fit checks as the API before it queues a run.
    run = await run_service().submit(RunConfig.parse(config))
    return str(_as_dict(run)["id"])


async def run_action(action: str, run_id: str) -> str | None:
    """stop / resume / clone / delete; clone returns the new run's id."""
    if action not in ("stop", "resume", "clone", "delete"):
        raise BackpropError(ErrorCode.INPUT_REQUEST_INVALID, f"Unknown run action {action!r}.")
    result = await getattr(run_service(), action)(run_id)
    if action == "clone" and result is not None:
        return str(_as_dict(result)["id"])
    return None


def run_dir(run_id: str) -> Path:
    """A browser-sent run id as its folder: one plain name inside runs_dir (the API's path policy)."""
    from backpropagate.server.security.paths import safe_path

    runs = get_settings().runs_dir
    if not run_id or any(c in run_id for c in "/\\~") or run_id.startswith("."):
        raise BackpropError(ErrorCode.STATE_RUN_NOT_FOUND, f"No run with id {run_id!r}.")
    path = safe_path(run_id, runs)
    if path.parent != runs.expanduser().resolve():
        raise BackpropError(ErrorCode.STATE_RUN_NOT_FOUND, f"No run with id {run_id!r}.")
    return path


def _read_events_sync(run_id: str, after: int, limit: int) -> list[EventBase]:
    out = []
    for ev in read_events(run_dir(run_id) / "events.jsonl", after=after):
        out.append(ev)
        if len(out) >= limit:
            break
    return out


async def read_run_events(run_id: str, after: int = 0, limit: int = 5000) -> list[EventBase]:
    """Events after ``after`` from the run's log (the source of truth), read off the event loop."""
    return await asyncio.to_thread(_read_events_sync, run_id, after, limit)


async def follow_events(run_id: str, after: int = 0) -> AsyncIterator[EventBase]:
    """The run's events after ``after``, history then live: the hub's stream, the same one the
    WebSocket serves (ends when the run has ended; a resume is followed by streaming again)."""
    run_dir(run_id)  # a browser-sent id must name a plain folder inside runs_dir
    async for line in run_service().events(run_id, after):
        if line is not None:  # None is a heartbeat
            yield line.event


async def log_tail(run_id: str, lines: int = 40) -> str:
    def tail() -> str:
        path = run_dir(run_id) / "worker.log"
        if not path.exists():
            return ""
        with path.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    return await asyncio.to_thread(tail)


# ---- data sets, models, system ------------------------------------------------------------------


async def save_upload(filename: str, data: bytes | BinaryIO, size: int | None = None) -> dict[str, Any]:
    """Store an uploaded data set under a generated name and record it; returns its record.

    A file object is copied in chunks under the size limit (a declared ``size`` over it is refused first).
    """
    from backpropagate.runs.uploads import store_upload, too_large, upload_limit, upload_suffix

    svc = run_service()
    upload_suffix(filename)
    if size is not None and size > upload_limit(svc.settings):
        raise too_large(filename, svc.settings, size)

    async def chunks() -> AsyncIterator[bytes]:
        if isinstance(data, bytes):
            yield data
            return
        while chunk := await asyncio.to_thread(data.read, 1 << 20):
            yield chunk

    try:
        return _as_dict(await store_upload(svc.store, svc.settings, filename, chunks()))
    except OSError as exc:  # a full disk is RUNTIME_DISK_FULL on the page, like at the API
        full = disk_full_error(exc, svc.settings.datasets_dir)
        if full is None:
            raise
        raise full from exc


async def list_datasets() -> list[dict[str, Any]]:
    rows = await asyncio.to_thread(run_service().store.list_datasets)
    return [_as_dict(r) for r in rows]


def example_files() -> list[str]:
    """The example data files shipped next to the package (a checkout or an installed copy)."""
    import backpropagate

    candidates = [
        Path(backpropagate.__file__).resolve().parent.parent / "examples",
        Path(backpropagate.__file__).resolve().parent / "examples",
    ]
    files: list[str] = []
    for folder in candidates:
        if folder.is_dir():
            files += [str(p) for p in sorted(folder.iterdir()) if p.suffix in (".jsonl", ".json", ".csv")]
    return files


def example_path(path: str) -> str:
    """A browser-sent example path, resolved inside the examples or uploads folder (else the error)."""
    from backpropagate.runs.inputs import EXAMPLES_DIR
    from backpropagate.server.security.paths import safe_path

    return str(safe_path(path, EXAMPLES_DIR, run_service().settings.datasets_dir))


def data_path(path: str) -> str:
    """A data path under the API's policy (resolve_data: uploads, examples, the allowed homes)."""
    from backpropagate.runs.inputs import resolve_data

    svc = run_service()
    return resolve_data(path, svc.settings, svc.store)


async def validate(path: str, model: str, max_seq_len: int, data_format: str = "auto") -> dict[str, Any]:
    """The data engineer's validation report (rows, format, histogram, errors with line numbers).

    ``path`` goes through the API's path policy first; a path outside it raises INPUT_PATH_TRAVERSAL.
    The check runs in a subprocess, as the API's: a tokenizer never loads in the server process.
    """
    from backpropagate.runs.datacheck import check_data

    path = await asyncio.to_thread(data_path, path)
    return await check_data(path, model=model, max_seq_len=max_seq_len, data_format=data_format, preview=5)


async def list_models() -> list[str]:
    names = ["demo", "demo-llama", "demo-qwen2"]
    models_dir = get_settings().models_dir
    if models_dir.is_dir():
        names += [str(p) for p in sorted(models_dir.iterdir()) if (p / "config.json").exists()]
    return list(dict.fromkeys(names))


def model_folder(model: str) -> str | None:
    """The local folder of a model name (a demo name or a folder), None for a hub id."""
    try:
        from backpropagate.models.demo import DEMO_NAMES, demo_path
    except ImportError:
        DEMO_NAMES, demo_path = (), None  # noqa: N806
    if model in DEMO_NAMES and demo_path is not None:
        return str(demo_path(model))
    folder = Path(model).expanduser()
    return str(folder) if folder.is_dir() else None


def memory_estimate(model: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """Peak memory for the chosen settings when the model's config.json is on disk, else None."""
    try:
        from backpropagate.training import memory
    except ImportError:
        return None
    model_dir = model_folder(model)
    if not model_dir or not (Path(model_dir) / "config.json").exists():
        return None
    shape = memory.shape_from_path(Path(model_dir))
    batch = config.get("batch_size")
    est = memory.estimate_memory(
        shape,
        method=config.get("method", "lora"),
        seq_len=int(config.get("max_seq_len", 1024)),
        micro_batch=batch if isinstance(batch, int) else 1,
        gradient_checkpointing=config.get("gradient_checkpointing") is True,
        lora_r=int(config.get("lora_r", 16)),
    )
    return est.to_dict()


def gpus() -> list[dict[str, Any]]:
    """Detected GPUs via NVML (empty on a CPU machine)."""
    try:
        from backpropagate import gpu

        for name in ("list_gpus", "detect_gpus", "query_gpus"):
            if hasattr(gpu, name):
                return [_as_dict(d) for d in getattr(gpu, name)()]
    except Exception:  # noqa: BLE001 - no NVML means no GPU, which the page says
        return []
    return []
