"""The optional extras (ui, export, unsloth): the command that adds one to this install.

The name ``backpropagate`` on the public package index belongs to another project, so a bare
``pip install 'backpropagate[export]'`` installs the wrong thing. The command given here installs
the extra from this checkout (editable), with this interpreter's pip.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

CHECKOUT_HINT = "/path/to/your/backpropagate/checkout"


def checkout_root() -> Path | None:
    """The source checkout this package runs from (the folder with its pyproject.toml), if any."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    try:
        text = pyproject.read_text()
    except OSError:
        return None
    return root if 'name = "backpropagate"' in text else None


def install_command(extra: str) -> str:
    """A shell command that installs ``extra`` into the running environment from the checkout."""
    root = checkout_root()
    target = f"{root if root is not None else CHECKOUT_HINT}[{extra}]"
    return f"{shlex.quote(sys.executable)} -m pip install -e {shlex.quote(target)}"


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python (the ``export`` extra: K-quants, verification, chat) can be imported."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
