"""Child-process entry that serves an already built front end: ``python -m backpropagate.launcher.serve``.

Runs in the build folder. It is Reflex's production server (static front end, ``/_event`` and
``/api`` on one port) without ``reflex run``'s rebuild, so a warm start takes seconds.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.umask(0o077)  # the DB, logs, uploads, exports and page state are readable by this user only
    host = os.environ.get("BACKPROPAGATE_UI_HOST", "127.0.0.1")
    port = int(os.environ.get("BACKPROPAGATE_UI_PORT", "7860"))
    from reflex_base import constants
    from reflex_base.environment import environment

    environment.REFLEX_ENV_MODE.set(constants.Env.PROD)
    # The front end was built by `reflex export`; the server only prepares the backend.
    environment.REFLEX_SKIP_COMPILE.set(True)
    from reflex.istate.manager import reset_disk_state_manager
    from reflex.utils import exec as rx_exec

    from backpropagate.launcher.asgi import TARGET

    reset_disk_state_manager()
    # What rx_exec.run_backend_prod does, with our app target (see launcher/asgi.py).
    environment.REFLEX_MOUNT_FRONTEND_COMPILED_APP.set(True)
    if rx_exec.should_use_granian():
        rx_exec.run_granian_backend_prod(host, port, constants.LogLevel.WARNING, app_target=TARGET)
    else:
        rx_exec.run_uvicorn_backend_prod(host, port, constants.LogLevel.WARNING, app_target=TARGET)


if __name__ == "__main__":
    sys.exit(main())
