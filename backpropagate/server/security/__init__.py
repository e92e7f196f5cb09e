"""The security layer: launch policy, the pure-ASGI guard, accounts and sandboxed paths.

Import the submodules directly in hot paths; this module re-exports the public names.
"""

from backpropagate.server.security.guard import build_guard, guard_from_launch
from backpropagate.server.security.paths import check_output_dir, safe_path
from backpropagate.server.security.policy import (
    SecurityPolicy,
    load_launch_policy,
    new_token,
    remove_launch_file,
    resolve_policy,
    strip_ambient_auth,
    write_launch_file,
)

__all__ = [
    "SecurityPolicy",
    "build_guard",
    "check_output_dir",
    "guard_from_launch",
    "load_launch_policy",
    "new_token",
    "remove_launch_file",
    "resolve_policy",
    "safe_path",
    "strip_ambient_auth",
    "write_launch_file",
]
