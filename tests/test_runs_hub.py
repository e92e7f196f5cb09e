"""The event hub: live fan-out in order without gaps; a slow subscriber catches up from the file."""

from __future__ import annotations

import asyncio
import threading
import time

from backpropagate.events import EventLog, Step
from backpropagate.runs import hub as hub_module
from backpropagate.runs.fold import downsample
from backpropagate.runs.hub import EventHub, LogTail
from backpropagate.runs.store import Run, Store


def test_log_tail_returns_complete_lines_only(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventLog(path, "r") as log:
        log.append(Step(step=1, total_steps=2, epoch=0.5, loss=1.0, lr=0.1))
    tail = LogTail(path)
    assert [(e.seq, e.text) for e in tail.read_lines()] == [(1, path.read_text().strip())]
    line = Step(step=2, total_steps=2, epoch=1, loss=1.0, lr=0.1, run_id="r", seq=2, ts=1.0).model_dump_json()
    with path.open("a") as fh:
        fh.write(line[:20])  # a writer caught mid-line
    assert tail.read() == []
    with path.open("a") as fh:
        fh.write(line[20:] + "\n")
    assert [e.seq for e in tail.read()] == [2]


def test_slow_subscriber_is_dropped_and_catches_up_without_gaps(tmp_path, monkeypatch):
    monkeypatch.setattr(hub_module, "QUEUE_SIZE", 16)
    drops = []
    original_offer = hub_module.Subscription.offer

    def counting_offer(self, item):
        ok = original_offer(self, item)
        if not ok:
            drops.append(self)
        return ok

    monkeypatch.setattr(hub_module.Subscription, "offer", counting_offer)
    runs_dir = tmp_path / "runs"
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.add_run(Run(id="r", status="running"))
    total = 1500

    def write() -> None:
        with EventLog(runs_dir / "r" / "events.jsonl", "r") as log:
            for i in range(1, total + 1):
                log.append(Step(step=i, total_steps=total, epoch=i / total, loss=1.0 / i, lr=1e-4))
                if i % 100 == 0:
                    time.sleep(0.01)

    async def main() -> tuple[list[int], list[int], list[str]]:
        hub = EventHub(store, runs_dir)
        writer = threading.Thread(target=write)
        ended: list[str] = []

        async def on_end(run_id, run, saw_final):
            ended.append(run_id)

        writer.start()  # alive before the watch starts, as a spawned worker is
        hub.watch("r", writer.is_alive, on_end)

        async def consume(delay: float) -> list[int]:
            seqs = []
            async for event in hub.stream("r", 0, heartbeat_s=5):
                if event is not None:
                    seqs.append(event.seq)
                    if delay:
                        await asyncio.sleep(delay)
            return seqs

        fast, slow = await asyncio.gather(consume(0), consume(0.002))
        return fast, slow, ended

    fast, slow, ended = asyncio.run(main())
    assert fast == list(range(1, total + 1))
    assert slow == list(range(1, total + 1))
    assert drops, "the slow subscriber should have overflowed its queue at least once"
    assert ended == ["r"]
    run = store.get_run("r")
    assert run.last_seq == total and run.step == total


def test_downsample_keeps_ends_and_extremes():
    points = [{"step": i, "loss": 1.0} for i in range(1, 1001)]
    points[500]["loss"] = 9.0  # a spike
    points[700]["loss"] = -3.0  # a dip
    out = downsample(points, 50)
    assert len(out) <= 50 and out[0]["step"] == 1 and out[-1]["step"] == 1000
    assert {"step": 501, "loss": 9.0} in out and {"step": 701, "loss": -3.0} in out
    assert [p["step"] for p in out] == sorted(p["step"] for p in out)
    assert downsample(points, 0) == points and downsample(points[:10], 50) == points[:10]
