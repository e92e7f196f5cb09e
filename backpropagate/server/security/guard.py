"""The guard: the security layers composed around an ASGI app, outermost first.

SecurityHeaders -> RateLimit -> RequestLimits -> HostAllowlist -> OriginCheck -> Authenticate ->
AuthEndpoints -> app. Headers sit outermost so that refusals carry them too; request limits come
before anything reads the body. Lifespan events pass straight through.
"""

from __future__ import annotations

from backpropagate.server.security.asgi import ASGIApp
from backpropagate.server.security.authenticate import Authenticate
from backpropagate.server.security.headers import DEFAULT_CSP, SecurityHeaders
from backpropagate.server.security.hosts import HostAllowlist
from backpropagate.server.security.limits import RequestLimits
from backpropagate.server.security.login import AuthEndpoints
from backpropagate.server.security.origin import OriginCheck
from backpropagate.server.security.policy import SecurityPolicy
from backpropagate.server.security.ratelimit import LoginThrottle, RateLimit, parse_proxies
from backpropagate.server.security.sessions import Authenticator
from backpropagate.settings import get_settings


def build_guard(
    app: ASGIApp,
    policy: SecurityPolicy,
    *,
    login_failures_per_minute: int = 5,
    requests_burst: float = 600,
    requests_per_second: float = 50,
    csp: str = DEFAULT_CSP,
) -> ASGIApp:
    """Wrap ``app`` so that every HTTP request and WebSocket passes the policy's checks.

    Body caps and trusted proxies come from Settings (``BACKPROPAGATE_SERVER__...``).
    """
    server = get_settings().server
    throttle = LoginThrottle(failures=login_failures_per_minute, per_minutes=1.0)
    auth = Authenticator(policy, throttle)
    inner: ASGIApp = AuthEndpoints(app, auth)
    inner = Authenticate(inner, auth)
    inner = OriginCheck(inner, policy.allowed_origins, allow_missing=policy.same_user_peers)
    inner = HostAllowlist(inner, policy.allowed_hosts)
    inner = RequestLimits(inner, server.max_request_kb * 1024, server.max_upload_mb * 1024 * 1024)
    inner = RateLimit(
        inner,
        throttle,
        capacity=requests_burst,
        per_second=requests_per_second,
        trust_tunnel_ip=policy.mode == "shared",
        trusted_proxies=parse_proxies(server.trusted_proxies),
    )
    return SecurityHeaders(inner, csp)


def guard_from_launch(app: ASGIApp) -> ASGIApp:
    """The wrapper for ``rx.App(api_transformer=[...])``: loads the launcher's policy, refuses without it."""
    from backpropagate.server.security.policy import load_launch_policy

    return build_guard(app, load_launch_policy())
