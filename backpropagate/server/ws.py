"""WebSockets: ``/api/runs/{id}/events?after=SEQ`` (one run's events) and ``/api/events`` (all runs' status).

A run stream sends the history after ``after``, then live events, in order and without gaps,
each as the event's JSON; ``{"type": "heartbeat"}`` every 15 s while idle (not an event: it has
no ``seq``); after the final event of a run that is no longer live, the server closes with 1000.
Every message is a model of ``backpropagate/events.py`` (``Wire``; docs/events.md).
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from backpropagate.errors import BackpropError
from backpropagate.events import HEARTBEAT_JSON as HEARTBEAT
from backpropagate.events import Error, WireMessage
from backpropagate.runs.hub import HEARTBEAT_S, run_status_message

router = APIRouter(tags=["events"])


async def _watch_disconnect(ws: WebSocket) -> None:
    # Clients do not send anything; reading is how a closed socket is noticed while idle.
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            await ws.receive_text()


@router.websocket("/runs/{run_id}/events")
async def run_events(ws: WebSocket, run_id: str, after: int = Query(0, ge=0)) -> None:
    service = ws.app.state.service
    try:
        await service.get(run_id)
    except BackpropError as err:
        await ws.accept()
        # The error event's shape, with seq 0: a refusal of the stream, never a line of the log.
        refusal = Error(
            run_id=run_id, code=str(err.code), message=err.message, hint=err.hint, retryable=err.retryable
        )
        await ws.send_text(refusal.model_dump_json())
        await ws.close(code=4404, reason=str(err.code))
        return
    await ws.accept()
    reader = asyncio.create_task(_watch_disconnect(ws))
    heartbeat = getattr(ws.app.state, "heartbeat_s", HEARTBEAT_S)
    try:
        async for event in service.events(run_id, after, heartbeat_s=heartbeat):
            if reader.done():
                return
            await ws.send_text(HEARTBEAT if event is None else event.text)
        await ws.close(code=1000)
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away
    finally:
        reader.cancel()


@router.websocket("/events")
async def all_events(ws: WebSocket) -> None:
    """Status changes of every run: ``run_status`` (and ``run_deleted``) messages, then live."""
    service = ws.app.state.service
    await ws.accept()
    sub = service.hub.subscribe(None)
    reader = asyncio.create_task(_watch_disconnect(ws))
    heartbeat = getattr(ws.app.state, "heartbeat_s", HEARTBEAT_S)
    try:
        for run in await service.list(["queued", "running", "paused"]):
            await ws.send_text(run_status_message(run).model_dump_json())
        while not reader.done():
            try:
                item = await asyncio.wait_for(sub.queue.get(), heartbeat)
            except TimeoutError:
                await ws.send_text(HEARTBEAT)
                continue
            if isinstance(item, WireMessage):
                await ws.send_text(item.model_dump_json())
            else:  # dropped for falling behind: start over from the current state
                service.hub.unsubscribe(sub)
                sub = service.hub.subscribe(None)
                for run in await service.list(["queued", "running", "paused"]):
                    await ws.send_text(run_status_message(run).model_dump_json())
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        service.hub.unsubscribe(sub)
        reader.cancel()
