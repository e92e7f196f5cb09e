"""`backprop runs ...`, `backprop watch` and `backprop serve-api`.

``runs list|show|reindex`` read the store directly (or a server with ``--url``). ``runs stop``
signals the worker (through the server with ``--url``); ``runs resume`` without ``--url`` starts
a detached worker itself, so pass ``--url`` when a server is running so that it schedules the run.
``watch`` follows the run's event log on disk, or the server's WebSocket with ``--url``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer

from backpropagate.errors import BackpropError, ErrorCode

runs_app = typer.Typer(
    help="List, inspect, stop, resume and delete training runs.",
    epilog="Example: backprop runs list    |    backprop runs stop RUN_ID",
    no_args_is_help=True,
)

URL_HELP = "Talk to the API server at this URL (e.g. http://127.0.0.1:8000) instead of the local store."
COLUMNS = ("id", "name", "status", "step", "loss", "tokens_per_s", "created_at", "gpus")


def _unreachable(url: str, exc: BaseException) -> BackpropError:
    return BackpropError(
        ErrorCode.RUNTIME_SERVER_UNREACHABLE,
        f"Could not reach {url} ({exc}); is `backprop serve-api` / `backprop ui` running?",
    )


def _api(method: str, url: str, path: str, **kw: Any) -> Any:
    import httpx

    try:
        resp = httpx.request(method, url.rstrip("/") + path, timeout=30, **kw)
    except httpx.TransportError as exc:
        raise _unreachable(url, exc) from exc
    except httpx.HTTPError as exc:
        raise BackpropError(ErrorCode.RUNTIME_INTERNAL, f"Request to {url} failed: {exc}") from exc
    if resp.status_code >= 400:
        try:
            body = resp.json()
            raise BackpropError(body["code"], body.get("message"), hint=body.get("hint"))
        except (ValueError, KeyError):
            raise BackpropError(
                ErrorCode.RUNTIME_INTERNAL, f"HTTP {resp.status_code}: {resp.text[:500]}"
            ) from None
    return resp.json() if resp.content else None


def _store():
    from backpropagate.runs.store import open_store

    return open_store()


def _row(run: Any) -> dict[str, Any]:
    return run if isinstance(run, dict) else run.model_dump()


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in COLUMNS:
        table.add_column(col, no_wrap=col in ("id", "status"))  # ids are copied from here
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        step = f"{r['step']}/{r['total_steps']}" if r.get("total_steps") else str(r["step"])
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else ""
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else ""
        # Which GPUs a run holds, or for a queued run what it waits for.
        gpus = r.get("queued_reason") if r["status"] == "queued" else ",".join(map(str, r.get("gpus") or []))
        table.add_row(r["id"], r.get("name") or "", r["status"], step, loss, tps, created, gpus or "")
    Console().print(table)


@runs_app.command(
    "list",
    epilog="Examples: backprop runs list    |    backprop runs list --json --url http://127.0.0.1:7860",
)
def list_cmd(
    status: list[str] = typer.Option(None, "--status", "-s", help="Only runs with this status (repeatable)."),
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """List runs, newest first."""
    if url:
        rows = _api("GET", url, "/api/runs", params={"status": status or []})
    else:
        rows = [_row(r) for r in _store().list_runs(status or None)]
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        _print_table(rows)


@runs_app.command("show", epilog="Example: backprop runs show 20260101-120000-ab12")
def show_cmd(
    run_id: str,
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
) -> None:
    """Print one run as JSON (config, status, progress, error, final metrics)."""
    row = _api("GET", url, f"/api/runs/{run_id}") if url else _row(_store().get_run(run_id))
    print(json.dumps(row, indent=2, default=str))


def disk_checkpoints(run_id: str) -> list[dict[str, Any]]:
    """The run's complete checkpoints as they are on disk now, oldest first.

    The folders are the truth: the store's rows keep pruned checkpoints and miss one written just
    before a kill. A folder counts once its ``meta.json`` is written (``.partial`` ones never do).
    """
    from backpropagate.settings import get_settings

    run = _store().get_run(run_id)
    roots = {Path(row.path).parent for row in _store().checkpoints(run_id) if row.path}
    roots.add(get_settings().runs_dir / run.id / "checkpoints")
    found: dict[int, dict[str, Any]] = {}
    for root in roots:
        for folder in sorted(root.glob("step-*")):
            if folder.name.endswith(".partial") or not folder.is_dir():
                continue
            try:
                meta = json.loads((folder / "meta.json").read_text())
            except (OSError, ValueError):
                continue  # not complete yet, or torn: a resume would skip it too
            files = meta.get("files") or {}
            found[int(meta["step"])] = {
                "step": int(meta["step"]),
                "path": str(folder.resolve()),
                "bytes": sum(int(f.get("bytes", 0)) for f in files.values()),
                "eval_loss": meta.get("eval_loss"),
                "best": False,
                "created_at": folder.stat().st_mtime,
            }
    rows = [found[step] for step in sorted(found)]
    scored = [r for r in rows if r["eval_loss"] is not None]
    if scored:
        min(scored, key=lambda r: r["eval_loss"])["best"] = True
    return rows


@runs_app.command(
    "checkpoints",
    epilog="Examples: backprop runs checkpoints RUN_ID    |    backprop runs checkpoints RUN_ID --json",
)
def checkpoints_cmd(
    run_id: str,
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """List a run's checkpoints (step, size, eval loss, best, folder): what `runs resume` and
    `backprop export RUN_ID/checkpoints/step-NNNNNN` can use. Read from the run folder itself."""
    rows = _api("GET", url, f"/api/runs/{run_id}/checkpoints") if url else disk_checkpoints(run_id)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        print(f"{run_id}: no checkpoints yet", file=sys.stderr)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("step", "size", "eval_loss", "best", "path"):
        table.add_column(col, overflow="fold")
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if r.get("eval_loss") is not None else ""
        size = f"{r['bytes'] / 1e6:.1f} MB" if r.get("bytes") else ""
        table.add_row(str(r["step"]), size, loss, "yes" if r.get("best") else "", r["path"])
    Console().print(table)


@runs_app.command("stop", epilog="Example: backprop runs stop 20260101-120000-ab12")
def stop_cmd(run_id: str, url: str | None = typer.Option(None, "--url", help=URL_HELP)) -> None:
    """Stop a run: the worker finishes its step, writes a checkpoint and ends as cancelled."""
    if url:
        row = _api("POST", url, f"/api/runs/{run_id}/stop")
        print(f"{run_id}: {row['status']} (stop requested)", file=sys.stderr)
        return
    import os
    import signal

    from backpropagate.runs.liveness import is_our_worker
    from backpropagate.settings import get_settings

    run = _store().get_run(run_id)
    run_dir = get_settings().runs_dir.resolve() / run_id
    if run.status not in ("running", "paused") or not run.pid or not is_our_worker(run.pid, run_dir):
        raise BackpropError(ErrorCode.STATE_RUN_NOT_ACTIVE, f"Run {run_id} has no live worker ({run.status}).",
                            hint="Only running runs can be stopped; queued runs are stopped through the server (--url).")  # fmt: skip
    os.killpg(run.pid, signal.SIGTERM)
    print(f"{run_id}: stop requested (pid {run.pid})", file=sys.stderr)


@runs_app.command(
    "resume", epilog="Example: backprop runs resume 20260101-120000-ab12 --url http://127.0.0.1:7860"
)
def resume_cmd(run_id: str, url: str | None = typer.Option(None, "--url", help=URL_HELP)) -> None:
    """Resume a stopped, failed or interrupted run from its last checkpoint."""
    if url:
        row = _api("POST", url, f"/api/runs/{run_id}/resume")
        print(f"{run_id}: {row['status']}", file=sys.stderr)
        return
    import subprocess

    from backpropagate.runs.scheduler import worker_command
    from backpropagate.runs.store import RESUMABLE_STATUSES
    from backpropagate.settings import get_settings

    store = _store()
    run = store.get_run(run_id)
    if run.status not in RESUMABLE_STATUSES:
        raise BackpropError(ErrorCode.STATE_RUN_NOT_RESUMABLE, f"Run {run_id} is {run.status}.")
    run_dir = get_settings().runs_dir.resolve() / run_id
    with (run_dir / "worker.log").open("ab") as out:
        proc = subprocess.Popen([*worker_command(), str(run_dir)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, cwd=run_dir, start_new_session=True)  # fmt: skip
    store.update_run(run_id, status="running", pid=proc.pid, error_code=None, error_message=None)
    print(f"{run_id}: resumed (pid {proc.pid}); follow it with `backprop watch {run_id}`", file=sys.stderr)


@runs_app.command("delete", epilog="Example: backprop runs delete 20260101-120000-ab12")
def delete_cmd(
    run_id: str,
    url: str | None = typer.Option(None, "--url", help=URL_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a finished run and its folder (refused while it is active)."""
    if not yes and not typer.confirm(f"Delete run {run_id} and its files?"):
        raise typer.Exit(1)
    if url:
        _api("DELETE", url, f"/api/runs/{run_id}")
    else:
        import shutil

        from backpropagate.runs.store import ACTIVE_STATUSES
        from backpropagate.settings import get_settings

        store = _store()
        run = store.get_run(run_id)
        if run.status in ACTIVE_STATUSES:
            raise BackpropError(ErrorCode.STATE_RUN_ACTIVE, f"Run {run_id} is {run.status}.")
        store.delete_run(run_id)
        shutil.rmtree(get_settings().runs_dir / run_id, ignore_errors=True)
    print(f"{run_id}: deleted", file=sys.stderr)


@runs_app.command("reindex", epilog="Example: backprop runs reindex")
def reindex_cmd() -> None:
    """Rebuild the run store from the event logs under BACKPROPAGATE_HOME/runs/."""
    from backpropagate.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    count = _store().reindex(settings.runs_dir)
    print(f"reindexed {count} run(s) from {settings.runs_dir}", file=sys.stderr)


def _follow_file(run_id: str, after: int):
    """Events from the log on disk, following it until a final event (no server needed)."""
    from backpropagate.events import FINAL_TYPES
    from backpropagate.runs.hub import LogTail
    from backpropagate.settings import get_settings

    path = get_settings().runs_dir / run_id / "events.jsonl"
    if not path.parent.is_dir():
        raise BackpropError(ErrorCode.STATE_RUN_NOT_FOUND, f"No run folder {path.parent}.")
    tail = LogTail(path)
    while True:
        events = tail.read()
        for event in events:
            if event.seq > after:
                yield event.model_dump(mode="json")
        if events and events[-1].type in FINAL_TYPES and tail.size() == tail.offset:
            return
        if not events:
            time.sleep(0.1)


def _follow_ws(url: str, run_id: str, after: int):
    from websockets.sync.client import connect

    ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1).rstrip("/")
    try:
        ws = connect(f"{ws_url}/api/runs/{run_id}/events?after={after}")
    except OSError as exc:
        raise _unreachable(url, exc) from exc
    from backpropagate.events import Error, EventBase, parse_wire

    with ws:
        for message in ws:
            item = parse_wire(message)
            if isinstance(item, Error) and item.seq == 0:  # the server refused the stream
                raise BackpropError(item.code, item.message, hint=item.hint)
            if isinstance(item, EventBase):  # heartbeats are not events
                yield item.model_dump(mode="json")


def watch(
    run_id: str = typer.Argument(..., help="The run to follow."),
    url: str | None = typer.Option(None, "--url", help="Follow through this server's WebSocket."),
    after: int = typer.Option(0, "--after", help="Start after this event seq."),
    as_json: bool = typer.Option(False, "--json", help="Print each event as a JSON line to stdout."),
) -> None:
    """Follow a run's events with a progress bar until it ends."""
    import itertools

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    events = _follow_ws(url, run_id, after) if url else _follow_file(run_id, after)
    # The first event before any bar is drawn: a missing run or server fails with its code alone.
    first = next(events, None)
    events = itertools.chain([first] if first is not None else [], events)
    final = None
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=as_json, console=Console(stderr=True),
    ) as progress:  # fmt: skip
        task = progress.add_task(run_id, total=None, info="")
        for data in events:
            if as_json:
                print(json.dumps(data), flush=True)
            kind = data["type"]
            if kind == "step":
                info = f"loss {data['loss']:.4f}"
                if data.get("tokens_per_s"):
                    info += f"  {data['tokens_per_s']:.0f} tok/s"
                progress.update(task, completed=data["step"], total=data["total_steps"], info=info)
            elif not as_json and kind in (
                "warning",
                "error",
                "paused",
                "resumed",
                "checkpoint",
                "oom_recovered",
            ):
                progress.console.print(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in data.items()
                                                               if k not in ("v", "run_id", "ts", "type")))  # fmt: skip
            if kind in ("completed", "failed", "cancelled"):
                final = data
    if final is None:
        print(f"{run_id}: the stream ended without a final event (worker gone?)", file=sys.stderr)
        raise typer.Exit(1)
    print(f"{run_id}: {final['type']}" + (f" [{final['code']}] {final['message']}" if final["type"] == "failed" else ""),
          file=sys.stderr)  # fmt: skip
    if final["type"] == "failed":
        raise typer.Exit(1)


def serve_api(
    host: str | None = typer.Option(
        None,
        "--host",
        help="Interface to bind; non-loopback needs --auth. [default: BACKPROPAGATE_SERVER__HOST, 127.0.0.1]",
    ),
    port: int | None = typer.Option(
        None, "--port", help="Port to listen on. [default: BACKPROPAGATE_SERVER__PORT if set, else 8000]"
    ),
    log_level: str = typer.Option("info", "--log-level"),
    auth: str | None = typer.Option(None, "--auth", help="user:password for HTTP Basic and login."),
    auth_file: Path | None = typer.Option(None, "--auth-file", help="File (mode 600) holding user:password."),
    users: Path | None = typer.Option(
        None, "--users", help="Users file (JSON, made by `backprop users add`)."
    ),
) -> None:
    """Run the API server alone (no web UI): REST under /api, WebSockets, docs at /api/docs.

    Behind the same guard as `backprop ui`. Default local mode: this user's own processes get in,
    other clients send the printed token; --auth (or --auth-file / --users) asks for accounts.
    """
    from backpropagate.launcher.api import ApiOptions
    from backpropagate.launcher.api import serve_api as run
    from backpropagate.runs.scheduler import hold_server_lock
    from backpropagate.settings import get_settings

    # Refuse before binding: a second server on this home would double the run limit and ignore
    # stops sent to the first. The lock is held until this process exits.
    hold_server_lock(get_settings().runs_dir)
    run(ApiOptions(host, port, log_level, auth, auth_file, users))


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
    app.command(
        "watch",
        epilog="Examples: backprop watch RUN_ID    |    backprop watch RUN_ID --json --url http://127.0.0.1:7860",
    )(watch)
    app.command(
        "serve-api",
        epilog="Example: backprop serve-api --port 8000, then backprop runs list --url http://127.0.0.1:8000",
    )(serve_api)
