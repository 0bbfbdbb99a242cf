"""Bearer tokens: who is calling, in which workspace, with which scope.

Tokens are stored as sha256 hashes only; the valid ones live in memory (a revoke takes effect on
the next request). The server's bootstrap token is written once to the data dir (0600) and is the
admin of the `default` workspace, the server operator's; deleting the file rotates it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy import Engine, insert, select, update

from ember.api.errors import ApiException
from ember.config import TOKEN_FILE
from ember.store import tables

log = logging.getLogger("ember.auth")

DEFAULT_WORKSPACE = "default"


class Scope(IntEnum):
    """Ordered: each scope can do everything the ones below it can."""

    READ = 0
    INVOKE = 1
    DEPLOY = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: Any) -> Scope:
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        raise ValueError(
            f"scope {value!r} is not one of " + ", ".join(s.label for s in cls) + " (least first)"
        )


@dataclass(frozen=True)
class Principal:
    """The caller behind a valid token."""

    token: str
    """The token's name, unique among the live tokens of its workspace."""
    workspace: str
    scope: Scope
    policy: str | None = None
    expires_at: float | None = None
    bootstrap: bool = False

    @property
    def actor(self) -> str:
        return f"token:{self.workspace}/{self.token}"

    @property
    def operator(self) -> bool:
        """An admin of the default workspace runs the server: it may create workspaces."""
        return self.workspace == DEFAULT_WORKSPACE and self.scope is Scope.ADMIN


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "ember_" + secrets.token_urlsafe(32)


def ensure_token(engine: Engine, data_dir: Path) -> None:
    """Make sure the bootstrap token file exists and is known.

    Deleting the token file and restarting rotates the bootstrap token: the old one stops working.
    """
    path = data_dir / TOKEN_FILE
    now = time.time()
    with engine.begin() as conn:
        token = path.read_text().strip() if path.exists() else ""
        t = tables.tokens.c
        if not token:
            conn.execute(
                update(tables.tokens)
                .where(t.bootstrap.is_(True), t.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            token = new_token()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            log.info("created a new API token in %s", path)
        os.chmod(path, 0o600)
        h = token_hash(token)
        if conn.execute(select(t.id).where(t.hash == h)).first() is None:
            conn.execute(
                insert(tables.tokens).values(
                    name="admin",
                    hash=h,
                    created_at=now,
                    workspace=DEFAULT_WORKSPACE,
                    scope=Scope.ADMIN.label,
                    bootstrap=True,
                )
            )


class Tokens:
    """The live tokens, by hash; loaded once, changed by the token endpoints."""

    def __init__(self, engine: Engine, token_path: Path) -> None:
        self.token_path = token_path
        self._by_hash: dict[str, Principal] = {}
        with engine.connect() as conn:
            t = tables.tokens.c
            for row in conn.execute(select(tables.tokens).where(t.revoked_at.is_(None))).mappings():
                self._by_hash[row["hash"]] = _principal(row)

    def add(self, h: str, who: Principal) -> None:
        self._by_hash[h] = who

    def remove(self, workspace: str, name: str) -> None:
        for h, who in list(self._by_hash.items()):
            if who.workspace == workspace and who.token == name:
                del self._by_hash[h]

    def live(self) -> list[Principal]:
        return list(self._by_hash.values())

    def check(self, header: str, now: float) -> Principal:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiException(
                401,
                "unauthorized",
                "missing bearer token: send 'Authorization: "
                f"Bearer <token>' (the server's token is in {self.token_path})",
            )
        # A dict lookup by the hash: the hash of a guess reveals nothing about a real token.
        who = self._by_hash.get(token_hash(token.strip()))
        if who is None:
            raise ApiException(401, "unauthorized", "invalid or revoked token")
        if who.expires_at is not None and now >= who.expires_at:
            raise ApiException(
                401,
                "token_expired",
                f"token {who.token!r} expired at {_iso(who.expires_at)}; "
                "ask an admin of the workspace for a new one (`ember token create`)",
            )
        return who


def _principal(row: Any) -> Principal:
    return Principal(
        token=row["name"],
        workspace=row["workspace"],
        scope=Scope.parse(row["scope"]),
        policy=row["policy"],
        expires_at=row["expires_at"],
        bootstrap=bool(row["bootstrap"]),
    )


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


AuditFailure = Callable[[Request, str, str], None]
"""Records a refused request: (request, action, message)."""


class Auth:
    """Checks each request's token and scope; failures are refused and audited."""

    def __init__(self, tokens: Tokens, on_refused: AuditFailure) -> None:
        self.tokens = tokens
        self.on_refused = on_refused

    def require(self, request: Request, scope: Scope) -> Principal:
        try:
            who = self.tokens.check(request.headers.get("authorization", ""), time.time())
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
