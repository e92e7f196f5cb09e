"""The command that adds an optional extra really installs it from this checkout (never the
unrelated `backpropagate` on PyPI), and the web app offers only what is installed."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from backpropagate.errors import CATALOG, ErrorCode
from backpropagate.extras import checkout_root, install_command
from ui_app.state.export import quantizations

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_export_install_command_resolves_this_checkouts_extra(tmp_path: Path) -> None:
    command = install_command("export")
    assert checkout_root() == REPO and f"{REPO}[export]" in command
    # Run from another folder, offline (--no-index): it must resolve to this project and its extra.
    args = [*shlex.split(command), "--dry-run", "--no-index", "--no-build-isolation"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Would install backpropagate-" in done.stdout
    assert "llama-cpp-python" in done.stdout or "llama_cpp_python" in done.stdout  # the extra's requirement
    # The catalog's hint gives the same command relative to the checkout, and warns off the namesake.
    hint = CATALOG[ErrorCode.DEP_LLAMA_CPP_MISSING].hint
    assert "pip install -e '.[export]'" in hint and "pip install 'backpropagate[export]'" not in hint


def test_without_llama_cpp_the_export_page_offers_no_k_quants() -> None:
    assert "q4_k_m" in quantizations("gguf", True)
    assert quantizations("gguf", False) == ["q8_0", "f16", "f32"]
    assert quantizations("merged", False) == quantizations("merged", True)
