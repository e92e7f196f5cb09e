"""The guard: the security layers composed around an ASGI app, outermost first.

SecurityHeaders -> RateLimit -> HostAllowlist -> OriginCheck -> Authenticate -> AuthEndpoints -> app.
Headers sit outermost so that refusals carry them too. Lifespan events pass straight through.
"""

from __future__ import annotations

from backpropagate.server.security.asgi import ASGIApp
from backpropagate.server.security.authenticate import Authenticate
from backpropagate.server.security.headers import DEFAULT_CSP, SecurityHeaders
from backpropagate.server.security.hosts import HostAllowlist
from backpropagate.server.security.login import AuthEndpoints
from backpropagate.server.security.origin import OriginCheck
from backpropagate.server.security.policy import SecurityPolicy
from backpropagate.server.security.ratelimit import LoginThrottle, RateLimit
from backpropagate.server.security.sessions import Authenticator


def build_guard(
    app: ASGIApp,
    policy: SecurityPolicy,
    *,
    login_failures_per_minute: int = 5,
    requests_burst: float = 600,
    requests_per_second: float = 50,
    csp: str = DEFAULT_CSP,
) -> ASGIApp:
    """Wrap ``app`` so that every HTTP request and WebSocket passes the policy's checks."""
    throttle = LoginThrottle(failures=login_failures_per_minute, per_minutes=1.0)
    auth = Authenticator(policy, throttle)
    inner: ASGIApp = AuthEndpoints(app, auth)
    inner = Authenticate(inner, auth)
    inner = OriginCheck(inner, policy.allowed_origins)
    inner = HostAllowlist(inner, policy.allowed_hosts)
    inner = RateLimit(
        inner,
        throttle,
        capacity=requests_burst,
        per_second=requests_per_second,
        trust_tunnel_ip=policy.mode == "shared",
    )
    return SecurityHeaders(inner, csp)


def guard_from_launch(app: ASGIApp) -> ASGIApp:
    """The wrapper for ``rx.App(api_transformer=[...])``: loads the launcher's policy, refuses without it."""
    from backpropagate.server.security.policy import load_launch_policy

    return build_guard(app, load_launch_policy())
