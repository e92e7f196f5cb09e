"""A Reflex plugin that makes the built front end talk to whatever origin served the page.

Reflex bakes ``api_url`` (``http://localhost:PORT``) into the bundle and, in the browser, swaps
only the host name for the page's. Behind an SSH tunnel on another local port
(``ssh -L 9000:localhost:7860``) or a reverse proxy, the socket then goes to the baked port and
fails. We patch Reflex's ``getBackendURL`` at compile time so it takes the page's host *and* port.
"""

from __future__ import annotations

from reflex.plugins import Plugin

# The lines of reflex_base/.templates/web/utils/state.js (Reflex 0.10.1) that we replace.
# If Reflex changes them, the build fails loudly here instead of shipping a broken socket URL.
_HOST_LINE = "endpoint.hostname = frontend_hostname;"
_HTTPS_PORT_LINE = 'endpoint.port = ""; // Assume websocket is on https port via load balancer.'

STATE_JS = "utils/state.js"
MARKER = "/* backpropagate: same-origin backend */"


def patch_state_js(source: str) -> str:
    """Return state.js with getBackendURL taking the page's host and port."""
    if MARKER in source:
        return source
    for needle in (_HOST_LINE, _HTTPS_PORT_LINE):
        if source.count(needle) != 1:
            raise RuntimeError(
                f"{STATE_JS}: expected exactly one {needle!r} in Reflex's getBackendURL; "
                "this Reflex version is not supported (pin reflex==0.10.1)"
            )
    # `host` carries the port; an empty page port (default 80/443) clears the baked one.
    source = source.replace(_HOST_LINE, f"{MARKER} endpoint.host = window.location.host;")
    # Over https keep the page's port too (a proxy on :8443 must not be sent to :443).
    return source.replace(_HTTPS_PORT_LINE, "endpoint.port = window.location.port;")


class SameOriginBackendPlugin(Plugin):
    """Rewrite the front end's backend URL to the page's own origin (tunnels, proxies)."""

    def pre_compile(self, **context) -> None:
        context["add_modify_task"](STATE_JS, patch_state_js)
