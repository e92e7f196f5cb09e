"""Event pipeline benchmark: worker log -> hub -> WebSocket, against a real `backprop serve-api`.

A bench engine (loaded by the real worker through BACKPROPAGATE_ENGINE) appends ``step`` events
to the run's log, as fast as it can or at a fixed rate. Clients follow the run's WebSocket and
time each event from its ``ts`` (stamped when written) to its arrival. Also measured: the cost of
appending one event against one CPU training step of a tiny model (telemetry must stay < 1%).

    python bench/events.py [--fast-events 20000] [--rates 20,200] [--seconds 10] [--clients 1,50]
Prints a table and writes bench/results/events.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent


def bench_engine(config, run_dir, emit, control=None):
    """The worker's engine for this benchmark: ``config.steps`` step events at BENCH_RATE per second."""
    from backpropagate.events import Completed, RunStarted, Step

    rate = float(os.environ.get("BENCH_RATE", "0"))
    total = config.steps
    emit(RunStarted(pid=os.getpid(), total_steps=total))
    start = time.perf_counter()
    for i in range(1, total + 1):
        if rate:
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        emit(Step(step=i, total_steps=total, epoch=i / total, loss=1.0, lr=1e-4, tokens_per_s=1.0))
    emit(Completed(step=total))
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, rate: float) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    env = dict(os.environ, BACKPROPAGATE_HOME=str(home), BENCH_RATE=str(rate),
               BACKPROPAGATE_ENGINE="events:bench_engine", BACKPROPAGATE_SERVER__MAX_CONCURRENT_RUNS="4")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "backpropagate", "serve-api", "--port", str(port), "--log-level", "warning"],
        env=env, cwd=REPO,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/api/runs", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


async def follow(
    url: str, run_id: str, ready: asyncio.Event, arrivals: list[tuple[float, float, int]]
) -> None:
    from websockets.asyncio.client import connect

    ws_url = url.replace("http://", "ws://") + f"/api/runs/{run_id}/events?after=0"
    # Generous timeouts: on a busy machine 50 clients in one process answer pings late.
    async with connect(ws_url, max_size=None, open_timeout=120, ping_interval=None) as ws:
        ready.set()
        async for message in ws:
            now = time.time()
            data = json.loads(message)
            if data.get("type") == "step":
                arrivals.append((data["ts"], now, data["seq"]))
            if data.get("type") == "completed":
                return


async def scenario(url: str, home: Path, data: str, events: int, clients: int) -> dict[str, float]:
    """Create a run, attach ``clients`` WebSockets while it is queued, and time every step event."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        run = (await http.post("/api/runs", json={"data": data, "steps": events, "device": "cpu"})).json()
        per_client: list[list[tuple[float, float, int]]] = [[] for _ in range(clients)]
        readies = [asyncio.Event() for _ in range(clients)]
        tasks = [
            asyncio.create_task(follow(url, run["id"], readies[i], per_client[i])) for i in range(clients)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
        (home / "runs" / run["id"] / "go").touch()
        await asyncio.wait_for(asyncio.gather(*tasks), 600)
    latencies = sorted((recv - sent) * 1000 for arrivals in per_client for sent, recv, _ in arrivals)
    first = per_client[0]
    gapless = all([a[2] for a in arr] == list(range(arr[0][2], arr[0][2] + len(arr))) for arr in per_client)
    span = first[-1][0] - first[0][0] if len(first) > 1 else float("nan")
    recv_span = first[-1][1] - first[0][1] if len(first) > 1 else float("nan")
    return {
        "events": len(first),
        "clients": clients,
        "write_rate": (len(first) - 1) / span if span else float("nan"),
        "deliver_rate": (len(first) - 1) / recv_span if recv_span else float("nan"),
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max_ms": latencies[-1],
        "gapless": gapless and all(len(a) == events for a in per_client),
    }


def emit_cost(n: int = 5000) -> dict[str, float]:
    """Microseconds to append one step event (flushed) and one durable event (fsynced)."""
    from backpropagate.events import Checkpoint, EventLog, Step

    with tempfile.TemporaryDirectory() as tmp, EventLog(Path(tmp) / "events.jsonl", "bench") as log:
        step = Step(step=1, total_steps=n, epoch=0.1, loss=1.0, lr=1e-4, grad_norm=0.5, tokens_per_s=1000.0)
        t0 = time.perf_counter()
        for _ in range(n):
            log.append(step)
        per_step = (time.perf_counter() - t0) / n * 1e6
        ckpt = Checkpoint(step=1, path="/x", bytes=1)
        t0 = time.perf_counter()
        for _ in range(200):
            log.append(ckpt)
        per_durable = (time.perf_counter() - t0) / 200 * 1e6
    return {"step_event_us": per_step, "durable_event_us": per_durable}


def tiny_step_ms(steps: int = 10) -> float:
    """Milliseconds per optimizer step of a tiny Llama (2 layers, hidden 256, batch 2 x 64 tokens) on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=2048, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 2048, (2, 64))
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]) * 1000


def versions() -> str:
    import importlib.metadata as md

    names = ("backpropagate", "fastapi", "uvicorn", "websockets", "pydantic", "torch")
    out = []
    for name in names:
        try:
            out.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            out.append(f"{name} (source)")
    return ", ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast-events", type=int, default=20000)
    parser.add_argument(
        "--rates",
        default="20,200",
        help="Fixed writer rates (events/s): a training run's pace, and a stress.",
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", default="1,50")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "events.md")
    args = parser.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-events-") as tmp:
        data = Path(tmp) / "home" / "datasets" / "d.jsonl"
        data.parent.mkdir(parents=True)
        data.write_text('{"text": "x"}\n')
        rates = [float(r) for r in args.rates.split(",")]
        writers = [("as fast as possible", 0.0, args.fast_events)]
        writers += [(f"{r:g} events/s", r, int(r * args.seconds)) for r in rates]
        for label, rate, events in writers:
            proc, url = start_server(Path(tmp) / "home", rate)
            try:
                for clients in client_counts:
                    # One process decodes every client's copy: cap the flood for many clients.
                    events = events if rate or clients == 1 else min(events, 2000)
                    result = asyncio.run(scenario(url, Path(tmp) / "home", str(data), events, clients))
                    rows.append({"writer": label, **result})
                    print(rows[-1], file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(30)
    cost = emit_cost()
    step_ms = tiny_step_ms()
    share = cost["step_event_us"] / 1000 / step_ms * 100

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}"
    lines = [
        "# Event pipeline benchmark",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine}; load average {os.getloadavg()[0]:.1f} at the end",
        f"- versions: Python {platform.python_version()}, {versions()}",
        "- path: worker appends to events.jsonl -> server's hub tails it (10 ms polls) -> WebSocket",
        "  clients in one process on loopback; latency = arrival time - the event's `ts` (when written).",
        "",
        "| writer | clients | events per client | write rate (ev/s) | delivered (ev/s, per client) "
        "| p50 latency (ms) | p99 latency (ms) | max (ms) | in order, no gaps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['writer']} | {r['clients']} | {r['events']} | {r['write_rate']:.0f} | {r['deliver_rate']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {'yes' if r['gapless'] else 'NO'} |"
        )
    lines += [
        "",
        "| cost | value |",
        "| --- | --- |",
        f"| append one step event (flush, no fsync) | {cost['step_event_us']:.1f} µs |",
        f"| append one durable event (fsync) | {cost['durable_event_us']:.1f} µs |",
        f"| one CPU training step, tiny Llama (2 x 256, batch 2 x 64) | {step_ms:.1f} ms |",
        f"| step event / training step | {share:.3f} % |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
