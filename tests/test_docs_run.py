"""Docs that run: every shell and Python block in README.md and docs/*.md runs against the demo model.

A block that cannot run here opts out with ``<!-- docs-test: skip — reason -->`` on the line
before its fence; one that fails because of a known code bug says
``<!-- docs-test: xfail — what is broken -->``. Placeholders (RUN_ID, RUN_DIR, $API, $RUN,
$EXPORT, the example run id) become real values created first. Long-running commands pass when
they start serving (see ``SERVERS``). Documented flags, settings, routes and error codes must exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
PAGES = ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))]
SHELL = {"bash", "sh", "console"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|xfail)\s*[—-]+\s*(.+?)\s*-->")
EXAMPLE_RUN = "20260101-120000-ab12"
EXAMPLE_DATASET = "ds-0123456789ab"

pytestmark = pytest.mark.slow

# Servers that run training runs: at most one per home.
RUN_SERVER = re.compile(r"\bbackprop (serve-api|ui)\b")
# Long-running commands: (pattern on the command line, pattern in its output meaning it serves).
SERVERS = [
    (
        re.compile(r"^backprop (serve|serve-api|ui)\b"),
        re.compile(r"https?://\S+|Uvicorn running|serving", re.I),
    ),
    (re.compile(r"^python -m websockets\b"), re.compile(r"Connected to", re.I)),
    (re.compile(r"^backprop chat\b"), re.compile(r"\S")),
]
SERVE_TIMEOUT = 90
# Commands that prompt: what they read on stdin.
INPUTS = [(re.compile(r"^backprop users add \w+\s*(#|$)"), "docs-password\ndocs-password\n")]
# curl answers that depend on where the run is (queued, running, completed) when the line runs.
STATE_ANSWERS = {"STATE_RUN_NOT_RESUMABLE", "STATE_RUN_NOT_ACTIVE", "STATE_RUN_ACTIVE"}


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    mark: str | None = None
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def extract_blocks() -> list[Block]:
    blocks = []
    for page in PAGES:
        lines = (REPO / page).read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w*)\s*$", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            lang = fence.group(1)
            if lang in SHELL or lang == "python":
                mark = MARKER.search(lines[i - 1]) if i else None
                code = "\n".join(lines[i + 1 : end])
                blocks.append(Block(page, i + 1, lang, code, *(mark.groups() if mark else ())))
            i = end + 1
    return blocks


BLOCKS = extract_blocks()


def commands(block: Block) -> list[str]:
    """The command lines of a shell block: prompts dropped, continuations joined."""
    out, current = [], ""
    for raw in block.code.splitlines():
        line = raw[2:] if block.lang == "console" and raw.startswith("$ ") else raw
        if block.lang == "console" and not raw.startswith(("$ ", " ")) and not current:
            continue  # output lines
        current += line
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            out.append(current.strip())
        current = ""
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A fresh home with a trained demo run, a running API server and the placeholder values."""
    work = tmp_path_factory.mktemp("docs-run")
    home = work / "home"
    env = {**os.environ, "BACKPROPAGATE_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.update(NO_COLOR="1", COLUMNS="200", TERM="dumb")
    (work / "examples").symlink_to(REPO / "examples")
    (work / ".venv").symlink_to(REPO / ".venv")
    for name in ("train.jsonl", "my-data.jsonl"):
        shutil.copy(REPO / "examples" / "quickstart.jsonl", work / name)
    (work / "my-data").mkdir()
    shutil.copy(REPO / "examples" / "quickstart.jsonl", work / "my-data" / "part.jsonl")
    train = [BIN / "backprop", "train", "--model", "demo", "--data", "examples/quickstart.jsonl"]
    done = subprocess.run(
        [*map(str, train), "--steps", "5", "--max-seq-len", "64", "--json"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout.strip().splitlines()[-1])["run_id"]
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    log = (work / "server.log").open("ab")
    server = subprocess.Popen(
        [str(BIN / "backprop"), "serve-api", "--port", str(port), "--log-level", "warning"],
        cwd=work, env=env, stdout=log, stderr=log,
    )  # fmt: skip
    stack = [server]
    try:
        wait_http(api + "/api/runs", server, work / "server.log")
        export = httpx.post(
            f"{api}/api/runs/{run_id}/exports", json={"format": "gguf", "quantization": "q8_0"}, timeout=30
        ).json()
        with open(work / "train.jsonl", "rb") as f:
            dataset = httpx.post(api + "/api/datasets", files={"file": f}, timeout=30).json()
        env.update(API=api, RUN=run_id, EXPORT=str(export.get("id", "")), PW="docs-password")
        wait_export(api, export["id"])
        chat = start_chat_server(run_id, work, env)
        stack.append(chat["proc"])
        values = {
            "backprop serve RUN_ID": f"backprop serve {run_id} --port {free_port()}",
            "~/.backpropagate": str(home),
            "RUN_DIR": str(home / "runs" / run_id),
            "RUN_ID": run_id,
            EXAMPLE_RUN: run_id,
            EXAMPLE_DATASET: str(dataset.get("id", EXAMPLE_DATASET)),
            "http://127.0.0.1:8000": api,
            "ws://127.0.0.1:8000": api.replace("http", "ws"),
            "--port 8000": f"--port {free_port()}",
        }
        clone = httpx.post(f"{api}/api/runs/{run_id}/clone", json={}, timeout=30).json()
        clone = clone.get("id") or clone["run_id"]
        pages = {"docs/export.md": {"http://127.0.0.1:8000": chat["url"]}}
        # A block that deletes a run (the run-management example ends in DELETE) gets a clone of
        # the shared run, found by what it does rather than by its line, which moves with edits.
        deleting = {EXAMPLE_RUN: clone}
        yield {"work": work, "env": env, "values": values, "pages": pages, "deleting": deleting}
    finally:
        for proc in stack:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 90
    while True:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.2)


def wait_export(api: str, export_id: str) -> None:
    deadline = time.time() + 120
    while (status := httpx.get(f"{api}/api/exports/{export_id}", timeout=10).json())["status"] == "running":
        assert time.time() < deadline, status
        time.sleep(0.5)
    assert status["status"] == "completed", status


def start_chat_server(run_id: str, work: Path, env: dict) -> dict:
    """`backprop serve RUN_ID` for the Python chat example (docs/export.md)."""
    port = free_port()
    log = work / "chat.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(BIN / "backprop"), "serve", run_id, "--port", str(port)],
            cwd=work, env=env, stdout=out, stderr=out,
        )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc, log)
    return {"proc": proc, "url": f"http://127.0.0.1:{port}"}


def substitute(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def run_serving(command: str, ready: re.Pattern, world) -> tuple[bool, str]:
    """Start a long-running command; it passes once its output matches ``ready``."""
    out = world["work"] / f"serve-{time.monotonic_ns()}.log"
    env = world["env"]
    if RUN_SERVER.search(command):
        # One server a home (the second is refused): the world's API server holds the shared one.
        env = {**env, "BACKPROPAGATE_HOME": str(world["work"] / f"home-{time.monotonic_ns()}")}
    with out.open("wb") as log:
        proc = subprocess.Popen(
            ["bash", "-c", command], cwd=world["work"], env=env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.time() + SERVE_TIMEOUT
        while time.time() < deadline:
            text = out.read_text(errors="replace")
            if ready.search(text):
                return True, text
            if proc.poll() is not None:
                return proc.returncode == 0 and bool(ready.search(out.read_text())), out.read_text()
            time.sleep(0.2)
        return False, out.read_text() + "\n(timed out before serving)"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


def run_block(block: Block, world) -> tuple[bool, str]:
    pages = world["pages"]
    values = {**world["values"], **pages.get(block.page, {}), **pages.get(block.id, {})}
    if re.search(rf"-X DELETE \S*/api/runs/{EXAMPLE_RUN}", block.code):
        values.update(world["deleting"])
    values = dict(sorted(values.items(), key=lambda kv: -len(kv[0])))  # longest first
    if block.lang == "python":
        done = subprocess.run(
            [str(BIN / "python"), "-c", substitute(block.code, values)],
            cwd=world["work"], env=world["env"], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return done.returncode == 0, done.stdout + done.stderr
    for command in commands(block):
        command = substitute(command, values)
        server = next((ready for pattern, ready in SERVERS if pattern.search(command)), None)
        if server:
            ok, output = run_serving(command, server, world)
        else:
            stdin = next((text for pattern, text in INPUTS if pattern.search(command)), "")
            done = subprocess.run(
                ["bash", "-c", "set -o pipefail; " + command], cwd=world["work"], env=world["env"],
                capture_output=True, text=True, timeout=120, input=stdin, start_new_session=True,
            )  # fmt: skip
            ok, output = done.returncode == 0, done.stdout + done.stderr
            code = re.search(r'"code":\s*"([A-Z_]+)"', done.stdout) if command.startswith("curl") else None
            if ok and code and code.group(1) not in STATE_ANSWERS:
                ok = False  # curl -s exits 0 on an error response
        if not ok:
            return False, f"$ {command}\n{output}"
    return True, ""


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_block_runs(block: Block, world):
    if block.mark == "skip":
        pytest.skip(f"docs-test: {block.reason}")
    ok, output = run_block(block, world)
    if block.mark == "xfail":
        if ok:
            pytest.fail(f"{block.id} is marked xfail ({block.reason}) but passes: remove the marker")
        pytest.xfail(block.reason)
    assert ok, f"{block.id} fails:\n{output[-3000:]}"


def test_block_counts(capsys):
    counts = {m: sum(b.mark == m for b in BLOCKS) for m in ("skip", "xfail")}
    ran = len(BLOCKS) - counts["skip"]
    line = (
        f"docs blocks: {len(BLOCKS)} found, {ran} run ({counts['xfail']} xfail), {counts['skip']} opted out"
    )
    with capsys.disabled():
        print("\n" + line)
    assert ran > counts["skip"], line
    pytest.skip(line)  # shown in the -ra summary


# --- Documented names must exist -------------------------------------------------------------


def doc_text() -> str:
    return "\n".join((REPO / p).read_text() for p in PAGES)


def cli_options() -> dict[tuple[str, ...], set[str]]:
    import click
    import typer

    from backpropagate.cli import app

    found: dict[tuple[str, ...], set[str]] = {}

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        found[path] = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def backprop_lines() -> list[str]:
    lines = []
    for block in BLOCKS:
        if block.lang in SHELL:
            for command in commands(block):
                for part in re.split(r"\s*(?:&&|\||;)\s*", command):
                    part = re.sub(r"^(\.venv/bin/)", "", part)
                    if part.startswith("backprop "):
                        lines.append(part)
    return lines + re.findall(r"`(backprop [^`]+)`", doc_text())  # and inline code in the prose


def test_documented_flags_exist():
    options = cli_options()
    bad = []
    for line in backprop_lines():
        words = shlex.split(line.replace("[", "").replace("]", ""), comments=True)[1:]
        path: tuple[str, ...] = ()
        while words and (*path, words[0]) in options:
            path, words = (*path, words[0]), words[1:]
        flags = {w.split("=", 1)[0] for w in words if w.startswith("-") and w != "-"}
        bad += [f"{line}: {flag}" for flag in sorted(flags - options[path])]
    assert not bad, "documented flags that do not exist:\n" + "\n".join(bad)


def test_documented_settings_exist():
    from pydantic import BaseModel

    from backpropagate.settings import Settings

    def exists(name: str) -> bool:
        model: type[BaseModel] | None = Settings
        for part in name.lower().split("__"):
            field = model.model_fields.get(part) if model else None
            if field is None:
                return False
            kind = field.annotation
            model = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
        return True

    from backpropagate.server.security import policy

    launcher = {policy.AUTH_ENV, policy.LAUNCH_ENV, policy.ALLOWED_HOSTS_ENV}
    names = set(re.findall(r"BACKPROPAGATE_[A-Z0-9_]*[A-Z0-9]", doc_text())) - launcher
    unknown = sorted(n for n in names if not exists(n.removeprefix("BACKPROPAGATE_")))
    assert not unknown, "documented settings that do not exist: " + ", ".join(unknown)


OLLAMA_ROUTES = {"/api/blobs/sha256", "/api/create", "/api/tags", "/api/delete"}  # the daemon's, in export.md


def api_routes() -> set[str]:
    import inspect

    from backpropagate.server.app import create_app
    from backpropagate.server.security import login

    app = create_app()
    routes = set(app.openapi()["paths"]) | {"/api/openapi.json", "/api/docs"}
    routes |= set(re.findall(r'"(/api/[^"]+)"', inspect.getsource(login)))
    for route in app.routes:  # WebSocket routes are not in the schema
        for sub in getattr(getattr(route, "original_router", None), "routes", []):
            if type(sub).__name__ == "APIWebSocketRoute":
                routes.add("/api" + sub.path)
    return routes


def test_documented_routes_exist():
    patterns = [re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$") for path in api_routes()]
    paths = {p.rstrip("/.") for p in re.findall(r"/api(?:/[\w{}$.:-]+)+", doc_text())}
    paths = {p.split(":")[0] for p in paths} - OLLAMA_ROUTES
    missing = sorted(p for p in paths if not any(pat.match(p) for pat in patterns))
    assert not missing, "documented routes that do not exist: " + ", ".join(missing)


def test_documented_error_codes_exist():
    from backpropagate.errors import ErrorCode

    prefixes = {code.split("_")[0] for code in ErrorCode}
    named = set(re.findall(r"`([A-Z]+(?:_[A-Z0-9]+)+)`", doc_text()))
    unknown = sorted(n for n in named if n.split("_")[0] in prefixes and n not in set(ErrorCode))
    assert not unknown, "documented error codes that do not exist: " + ", ".join(unknown)
