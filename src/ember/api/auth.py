"""The HTTP side of bearer tokens: read the Authorization header, ask the token room who it is,
refuse (401, 403) and audit the refusal otherwise.

The tokens themselves, workspaces and scopes live in `ember.control.tokens`; the names are
re-exported here for the routers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import Request

from ember.api.errors import ApiException
from ember.control.tokens import (
    DEFAULT_WORKSPACE,
    Principal,
    Scope,
    TokenBook,
    ensure_token,
    new_token,
    token_hash,
)

__all__ = [
    "DEFAULT_WORKSPACE",
    "AuditFailure",
    "Auth",
    "Principal",
    "Scope",
    "ensure_token",
    "need_admin",
    "need_deploy",
    "need_invoke",
    "need_read",
    "new_token",
    "token_hash",
]


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


AuditFailure = Callable[[Request, str, str], None]
"""Records a refused request: (request, action, message)."""


class Auth:
    """Checks each request's token and scope; failures are refused and audited."""

    def __init__(self, tokens: TokenBook, on_refused: AuditFailure) -> None:
        self.tokens = tokens
        self.on_refused = on_refused

    def check(self, header: str, now: float) -> Principal:
        """The principal behind an `Authorization: Bearer <token>` header, or a 401."""
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiException(
                401,
                "unauthorized",
                "missing bearer token: send 'Authorization: "
                f"Bearer <token>' (the server's token is in {self.tokens.token_path})",
            )
        who = self.tokens.find(token)
        if who is None:
            raise ApiException(401, "unauthorized", "invalid or revoked token")
        if who.expires_at is not None and who.expired(now):
            raise ApiException(
                401,
                "token_expired",
                f"token {who.token!r} expired at {_iso(who.expires_at)}; "
                "ask an admin of the workspace for a new one (`ember token create`)",
            )
        return who

    def require(self, request: Request, scope: Scope, header: str | None = None) -> Principal:
        """`header`: the Authorization header as read by the caller's API (RunPod's takes a bare
        key too); the request's own by default."""
        if header is None:
            header = request.headers.get("authorization", "")
        try:
            who = self.check(header, time.time())
        except ApiException as exc:
            self.on_refused(request, "auth.failed", exc.message)
            raise
        request.state.principal = who
        if who.scope < scope:
            message = (
                f"this needs a token with scope {scope.label} or higher; "
                f"token {who.token!r} has scope {who.scope.label}"
            )
            self.on_refused(request, "auth.forbidden", message)
            raise ApiException(403, "forbidden", message)
        return who


def _need(scope: Scope) -> Callable[[Request], Awaitable[Principal]]:
    # async: FastAPI runs a plain function dependency in a worker thread, a hop per request.
    async def dependency(request: Request) -> Principal:
        auth: Auth = request.app.state.auth
        return auth.require(request, scope)

    dependency.__name__ = f"need_{scope.label}"
    return dependency


need_read = _need(Scope.READ)
need_invoke = _need(Scope.INVOKE)
need_deploy = _need(Scope.DEPLOY)
need_admin = _need(Scope.ADMIN)
