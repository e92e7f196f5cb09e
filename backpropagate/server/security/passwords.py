"""Password hashing (argon2 through passlib) and the check that the guard's libraries load.

passlib and argon2 are imported on first use so that importing the package stays cheap.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

from backpropagate.errors import BackpropError, ErrorCode


@lru_cache(maxsize=1)
def _context() -> Any:
    # passlib 1.7.4 touches the deprecated `crypt` module and argon2.__version__; the warnings
    # are about passlib's internals, not about anything a user can change.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from passlib.context import CryptContext

        context = CryptContext(schemes=["argon2"], deprecated="auto")
        context.hash("warm-up")  # loads the argon2 backend inside the filter
    return context


def require_guard_libraries() -> None:
    """Raise RUNTIME_UI_AUTH_NOT_ENFORCED unless itsdangerous, passlib and argon2 all work."""
    try:
        import argon2  # noqa: F401
        import itsdangerous  # noqa: F401

        _context()  # hashes once: passlib reports a missing argon2 backend only when used
    except Exception as exc:  # ImportError, passlib's MissingBackendError, ...
        raise BackpropError(
            ErrorCode.RUNTIME_UI_AUTH_NOT_ENFORCED,
            f"The authentication layer cannot load ({type(exc).__name__}: {exc}).",
            hint="Reinstall its dependencies: `pip install passlib argon2-cffi itsdangerous`.",
        ) from exc


def hash_password(password: str) -> str:
    """An argon2 hash of ``password`` (the clear text is never stored)."""
    return _context().hash(password)


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return hash_password("no-such-user-placeholder")


def verify_password(password: str, hashed: str | None) -> bool:
    """Constant-time verification; an unknown user costs the same as a wrong password."""
    if hashed is None:
        _context().verify(password, _dummy_hash())
        return False
    try:
        return bool(_context().verify(password, hashed))
    except (ValueError, TypeError):  # a malformed hash in the users file
        return False
