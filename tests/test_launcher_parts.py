"""The launcher's parts: the same-origin patch of Reflex's state.js, build reuse, the share tunnel."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backpropagate.errors import BackpropError, ErrorCode
from backpropagate.launcher import tunnel, workdir
from ui_app.same_origin import MARKER, patch_state_js


def reflex_state_js() -> str:
    import reflex_base

    return (Path(reflex_base.__file__).parent / ".templates" / "web" / "utils" / "state.js").read_text()


def test_launcher_patch_takes_host_and_port_from_the_page() -> None:
    original = reflex_state_js()
    patched = patch_state_js(original)
    assert MARKER in patched
    assert "endpoint.host = window.location.host;" in patched
    # The baked port no longer survives, over http or https.
    assert "endpoint.hostname = frontend_hostname;" not in patched
    assert 'endpoint.port = "";' not in patched
    assert "endpoint.port = window.location.port;" in patched
    # Applying it twice changes nothing (Reflex may re-run the modify task on a rebuilt file).
    assert patch_state_js(patched) == patched


def test_launcher_patch_fails_loudly_on_an_unknown_reflex() -> None:
    changed = reflex_state_js().replace("endpoint.hostname = frontend_hostname;", "endpoint.hostname = h;")
    with pytest.raises(RuntimeError, match="not supported"):
        patch_state_js(changed)


def test_launcher_build_is_reused_until_the_app_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app_copy = tmp_path / "ui_app"
    shutil.copytree(workdir.app_package_dir(), app_copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(workdir, "app_package_dir", lambda: app_copy)
    home = tmp_path / "home"

    folder, digest, needs_build = workdir.prepare(home)
    assert needs_build
    assert folder.is_relative_to(home)
    assert (folder / "rxconfig.py").read_text() == workdir.RXCONFIG
    assert (folder / "reflex.lock" / "package-lock.json").is_file()  # the shipped lock is used

    # Pretend the build finished: the same sources reuse it.
    index = folder / ".web" / "build" / "client" / "index.html"
    index.parent.mkdir(parents=True)
    index.write_text("<html></html>")
    workdir.mark_built(folder, digest)
    assert workdir.prepare(home) == (folder, digest, False)

    # Byte-code caches do not count; an edited page does.
    (app_copy / "__pycache__").mkdir()
    (app_copy / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert workdir.prepare(home)[2] is False
    page = next(app_copy.rglob("pages/*.py"))
    page.write_text(page.read_text() + "\n# edited\n")
    _, new_digest, needs_build = workdir.prepare(home)
    assert needs_build and new_digest != digest


def fake_cloudflared(bin_dir: Path, pid_file: Path, line: str) -> None:
    """A stand-in that logs like cloudflared (to stderr, a boxed URL) and keeps running."""
    script = bin_dir / "cloudflared"
    script.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            echo $$ > {pid_file}
            echo "2026-01-01T00:00:00Z INF Requesting new quick Tunnel on trycloudflare.com..." >&2
            echo "2026-01-01T00:00:01Z INF |  {line}  |" >&2
            exec sleep 300
            """
        )
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_launcher_tunnel_reads_the_url_and_stops_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "cf.pid"
    fake_cloudflared(tmp_path, pid_file, "https://calm-river-1234.trycloudflare.com")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    t = tunnel.start(7860, tmp_path / "cf.log", timeout=20)
    try:
        assert t.url == "https://calm-river-1234.trycloudflare.com"
        assert t.host == "calm-river-1234.trycloudflare.com"
        pid = int(pid_file.read_text())
        os.kill(pid, 0)  # running
    finally:
        t.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "trycloudflare.com" in (tmp_path / "cf.log").read_text()


def test_launcher_tunnel_without_url_fails_with_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cloudflared(tmp_path, tmp_path / "cf.pid", "failed to request quick Tunnel: no network")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    start = time.monotonic()
    with pytest.raises(BackpropError) as exc:
        tunnel.start(7861, tmp_path / "cf.log", timeout=2)
    assert exc.value.code == ErrorCode.DEP_TUNNEL_FAILED
    assert "ssh -L 7861:localhost:7861" in exc.value.hint
    assert time.monotonic() - start < 15
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "cf.pid").read_text()), 0)


def test_launcher_help_lists_flags_without_heavy_imports() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from backpropagate.cli import app\n"
        "r = CliRunner().invoke(app, ['ui', '--help'], terminal_width=200)\n"
        "print(r.exit_code, r.output)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'reflex', 'torch', 'ui_app', 'transformers'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("0 ")
    for flag in ("--host", "--port", "--auth", "--auth-file", "--users", "--share", "--no-browser"):
        assert flag in out
    assert out.strip().endswith("[]"), "`backprop ui --help` imported reflex, torch or the app"
