"""Sandboxed file paths: every path from a request must resolve inside an allowed base folder.

``safe_path`` guards reads and writes of user-named files; ``check_output_dir`` refuses system
and credential folders as training or export destinations.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from backpropagate.errors import BackpropError, ErrorCode

# Folders no run may write into: the system's own files, and where credentials live.
_SYSTEM_DIRS = (
    "/etc", "/usr", "/bin", "/sbin", "/boot", "/dev", "/proc", "/sys", "/var",
    "/lib", "/lib32", "/lib64", "/run",
)  # fmt: skip
_HOME_CREDENTIAL_DIRS = (
    ".ssh", ".aws", ".gnupg", ".config", ".cache/huggingface", ".docker", ".kube",
    ".azure", ".netrc", ".git-credentials", ".huggingface",
)  # fmt: skip


# Files a request may never read, even inside an allowed base such as the home folder.
_HOME_SECRETS = (
    ".ssh", ".aws", ".gnupg", ".config", ".docker", ".kube", ".azure", ".netrc", ".git-credentials",
    ".huggingface/token", ".cache/huggingface/token", ".cache/huggingface/stored_tokens", ".pypirc",
)  # fmt: skip


def _secret_roots() -> list[Path]:
    home = Path.home()
    return [(home / p).resolve() for p in _HOME_SECRETS]


def _resolve(path: str | Path) -> Path:
    text = str(path)
    if "\x00" in text:
        raise BackpropError(ErrorCode.INPUT_PATH_TRAVERSAL, f"The path {text!r} contains a NUL byte.")
    # resolve() follows every symlink that exists, so a link pointing outside is caught.
    return Path(text).expanduser().resolve()


def safe_path(user_path: str | Path, *bases: Path) -> Path:
    """Resolve ``user_path`` (relative ones against the first base) and require it inside a base."""
    if not bases:
        raise ValueError("safe_path needs at least one base folder")
    candidate = Path(str(user_path))
    if not candidate.is_absolute() and not str(user_path).startswith("~"):
        candidate = Path(bases[0]) / candidate
    resolved = _resolve(candidate)
    roots = [Path(b).expanduser().resolve() for b in bases]
    if any(resolved == root or resolved.is_relative_to(root) for root in roots):
        # A base may be the home folder; its credential files are still off limits.
        secret = next((r for r in _secret_roots() if _inside(resolved, r)), None)
        if secret is not None:
            raise BackpropError(
                ErrorCode.INPUT_PATH_TRAVERSAL,
                f"The path {str(user_path)!r} resolves to {resolved}, inside the credential location {secret}.",
                hint="Point at a data or model file, not at credentials.",
            )
        return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise BackpropError(
        ErrorCode.INPUT_PATH_TRAVERSAL,
        f"The path {str(user_path)!r} resolves to {resolved}, outside the allowed folders ({allowed}).",
        hint=f"Use a path inside {allowed}.",
    )


def _temp_roots() -> list[Path]:
    # Temporary folders may sit under /var (macOS, /var/tmp); they are fine to write to.
    return [Path(tempfile.gettempdir()).resolve(), Path("/var/tmp").resolve()]


def forbidden_output_roots(home: Path | None = None) -> list[Path]:
    """The folders ``check_output_dir`` refuses (and everything below them)."""
    return [*_credential_roots(home), *(Path(p).resolve() for p in _SYSTEM_DIRS)]


def _credential_roots(home: Path | None = None) -> list[Path]:
    home = (home or Path.home()).expanduser()
    return [(home / p).resolve() for p in _HOME_CREDENTIAL_DIRS]


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def check_output_dir(path: str | Path) -> Path:
    """Resolve an output folder and refuse ``/``, system folders and credential folders."""
    resolved = _resolve(path)
    if resolved == Path(resolved.anchor):
        raise BackpropError(
            ErrorCode.UI_OUTPUT_DIR_FORBIDDEN, f"The output folder {str(path)!r} is the file system root."
        )
    # Credential folders first: a home folder may itself live under a temporary folder.
    blocked = [r for r in _credential_roots() if _inside(resolved, r)]
    if not blocked and not any(_inside(resolved, t) for t in _temp_roots()):
        blocked = [Path(p).resolve() for p in _SYSTEM_DIRS if _inside(resolved, Path(p).resolve())]
    if blocked:
        raise BackpropError(
            ErrorCode.UI_OUTPUT_DIR_FORBIDDEN,
            f"The output folder {str(path)!r} resolves to {resolved}, inside {blocked[0]}.",
        )
    return resolved
