"""The room of workspaces and their bearer tokens: who is calling, in which workspace, with which
scope.

Tokens are stored as sha256 hashes only; the valid ones live in memory (a revoke takes effect on
the next request). The server's bootstrap token is written once to the data dir (0600) and is the
admin of the `default` workspace, the server operator's; deleting the file rotates it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from ember.config import TOKEN_FILE
from ember.control.errors import ConflictError, NotFoundError
from ember.store import tables
from ember.store.writer import Op, Writer, execute

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

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True)
class Issued:
    """A token just created: its value is known here and nowhere else."""

    token: str
    who: Principal
    created_at: float


class TokenRefused(PermissionError):
    """The calling token may not make this token or workspace (HTTP 403): it would outlive the
    caller or escape the caller's usage policy."""


def _at(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def refusal(by: Principal, policy: str | None, expires_at: float | None, now: float) -> str | None:
    """Why the token `by` may not create a token with `policy` and `expires_at`, or None.

    A token hands on no more than it holds: one that expires makes only tokens that expire no
    later, and one bound to a usage policy makes only tokens bound to the same policy, so a
    short-lived or budgeted token cannot mint itself a way out.
    """
    if by.policy is not None and policy != by.policy:
        got = f"policy {policy!r}" if policy is not None else "no policy"
        return (
            f"this token is bound to usage policy {by.policy!r}, so every token it creates must "
            f"be too (asked for {got}): pass policy {by.policy!r}"
        )
    if by.expires_at is not None and (expires_at is None or expires_at > by.expires_at):
        left = max(0, int(by.expires_at - now))
        asked = "never expires" if expires_at is None else f"expires at {_at(expires_at)}"
        return (
            f"this token expires at {_at(by.expires_at)}, so a token it creates must expire no "
            f"later (this one {asked}): pass expires_in of at most {left} seconds"
        )
    return None


def workspace_refusal(by: Principal) -> str | None:
    """Why the token `by` may not create a workspace (whose admin token never expires and is
    bound to no policy), or None."""
    if by.policy is not None:
        return (
            f"this token is bound to usage policy {by.policy!r}; a new workspace's admin token "
            "would not be: create workspaces with a token bound to no policy"
        )
    if by.expires_at is not None:
        return (
            f"this token expires at {_at(by.expires_at)}; a new workspace's admin token never "
            "expires: create workspaces with a token that does not expire"
        )
    return None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "ember_" + secrets.token_urlsafe(32)


def _admin_token(workspace: str, digest: str, now: float, *, bootstrap: bool = False) -> Any:
    """The INSERT of a workspace's first admin token (the bootstrap one: the default's)."""
    return insert(tables.tokens).values(
        name="admin",
        hash=digest,
        created_at=now,
        workspace=workspace,
        scope=Scope.ADMIN.label,
        bootstrap=bootstrap,
    )


def ensure_token(engine: Engine, data_dir: Path, *, shared: bool = False) -> None:
    """Make sure the bootstrap token file exists and is known.

    Deleting the token file and restarting rotates the bootstrap token: the old one stops working.
    On a `shared` store (several servers), a server without the file joins the token the first
    server made instead: rotating it would lock every other server's callers out.
    """
    path = data_dir / TOKEN_FILE
    now = time.time()
    with engine.begin() as conn:
        token = path.read_text().strip() if path.exists() else ""
        t = tables.tokens.c
        live = (t.bootstrap.is_(True), t.revoked_at.is_(None))
        if not token and shared and conn.execute(select(t.id).where(*live)).first() is not None:
            log.info(
                "this store's admin token was made by another server: callers use that one "
                "(or a token from `ember token create`), and %s stays absent here",
                path,
            )
            return
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
            conn.execute(_admin_token(DEFAULT_WORKSPACE, h, now, bootstrap=True))


class TokenBook:
    """The workspaces and the live tokens, by hash; loaded once, changed through its methods."""

    def __init__(self, engine: Engine, token_path: Path) -> None:
        self.engine = engine
        self.token_path = token_path
        """The bootstrap token's file (named in the answer to a call without a token)."""
        self.writer: Writer | None = None
        """Set once the control plane starts; writes before that go to the store directly."""
        self._by_hash: dict[str, Principal] = {}
        with engine.connect() as conn:
            self.load(conn)

    def load(self, conn: Connection) -> None:
        """The live tokens as stored, swapped in whole (a standby loads again every second)."""
        t = tables.tokens.c
        self._by_hash = {
            row["hash"]: _principal(row)
            for row in conn.execute(select(tables.tokens).where(t.revoked_at.is_(None))).mappings()
        }

    # ------------------------------------------------------------------------- who is calling
    def find(self, token: str) -> Principal | None:
        """The live token's principal, expired or not; None for an unknown or revoked one."""
        # A dict lookup by the hash: the hash of a guess reveals nothing about a real token.
        return self._by_hash.get(token_hash(token))

    def live(self, workspace: str | None = None) -> list[Principal]:
        """The live tokens (expired ones too) of a workspace, or of all of them."""
        if workspace is None:
            return list(self._by_hash.values())
        return [p for p in self._by_hash.values() if p.workspace == workspace]

    def bound(self, workspace: str, policy: str) -> list[str]:
        """The names of the workspace's live tokens bound to `policy`, sorted."""
        return sorted(p.token for p in self.live(workspace) if p.policy == policy)

    # ------------------------------------------------------------------------- workspaces
    async def create_workspace(self, name: str, by: Principal | None = None) -> str:
        """A new workspace and its first admin token, in one transaction; returns the token.
        TokenRefused if `by` (the caller) expires or is bound to a policy (`workspace_refusal`)."""
        if by is not None and (why := workspace_refusal(by)) is not None:
            raise TokenRefused(why)
        w = tables.workspaces.c

        def exists() -> bool:
            with self.engine.connect() as conn:
                return conn.execute(select(w.name).where(w.name == name)).first() is not None

        if await asyncio.to_thread(exists):
            raise ConflictError(f"workspace {name!r} exists")
        token, now = new_token(), time.time()
        digest = token_hash(token)

        def write(conn: Connection) -> None:
            conn.execute(insert(tables.workspaces).values(name=name, created_at=now))
            conn.execute(_admin_token(name, digest, now))

        try:
            await self._write(write)
        except IntegrityError:  # created by a concurrent request since the check
            raise ConflictError(f"workspace {name!r} exists") from None
        self._by_hash[digest] = Principal(token="admin", workspace=name, scope=Scope.ADMIN)
        return token

    async def workspaces(self, only: str | None = None) -> list[dict[str, Any]]:
        """Every workspace by name (`name`, `created_at`), or only the one named `only`."""
        w = tables.workspaces.c
        q = select(w.name, w.created_at).order_by(w.name)
        if only is not None:
            q = q.where(w.name == only)

        def read() -> list[dict[str, Any]]:
            with self.engine.connect() as conn:
                return [dict(r) for r in conn.execute(q).mappings()]

        return await asyncio.to_thread(read)

    # ------------------------------------------------------------------------- tokens
    async def create(
        self,
        workspace: str,
        name: str,
        scope: Scope,
        policy: str | None = None,
        ttl: float | None = None,
        by: Principal | None = None,
    ) -> Issued:
        """A new token of the workspace; ConflictError if a live one has the name, TokenRefused
        if it would outlive `by` (the caller) or drop its policy (`refusal`)."""
        token, now = new_token(), time.time()
        expires_at = now + ttl if ttl is not None else None
        if by is not None and (why := refusal(by, policy, expires_at, now)) is not None:
            raise TokenRefused(why)
        if any(p.token == name for p in self.live(workspace)):
            raise ConflictError(
                f"a live token named {name!r} exists; revoke it first or pick another"
            )
        digest = token_hash(token)
        row = {
            "name": name,
            "hash": digest,
            "created_at": now,
            "workspace": workspace,
            "scope": scope.label,
            "policy": policy,
            "expires_at": expires_at,
        }
        who = Principal(name, workspace, scope, policy, expires_at)
        # Known before the write is awaited: a concurrent create of the same name sees it (409).
        self._by_hash[digest] = who
        try:
            await self._write(execute(insert(tables.tokens), row))
        except Exception:
            self._forget(workspace, name)
            raise
        return Issued(token, who, now)

    async def tokens(self, workspace: str) -> list[dict[str, Any]]:
        """The workspace's tokens, revoked ones included, oldest first; never their values."""
        t = tables.tokens.c
        q = select(tables.tokens).where(t.workspace == workspace).order_by(t.created_at)

        def read() -> list[dict[str, Any]]:
            with self.engine.connect() as conn:
                return [_token_row(r) for r in conn.execute(q).mappings()]

        return await asyncio.to_thread(read)

    async def revoke(self, workspace: str, name: str) -> float:
        """Revoke the live token at once (kept, revoked, for the audit trail); returns when."""
        if not any(p.token == name for p in self.live(workspace)):
            raise NotFoundError("token_not_found", f"no live token named {name!r}")
        now = time.time()
        t = tables.tokens.c
        await self._write(
            execute(
                update(tables.tokens)
                .where(t.workspace == workspace, t.name == name, t.revoked_at.is_(None))
                .values(revoked_at=now)
            )
        )
        self._forget(workspace, name)
        return now

    # ------------------------------------------------------------------------- inside
    def _forget(self, workspace: str, name: str) -> None:
        for h, who in list(self._by_hash.items()):
            if who.workspace == workspace and who.token == name:
                del self._by_hash[h]

    async def _write(self, op: Op) -> None:
        if self.writer is not None:
            await self.writer.submit(op)
            return

        def direct() -> None:
            with self.engine.begin() as conn:
                op(conn)

        await asyncio.to_thread(direct)


def _principal(row: Any) -> Principal:
    return Principal(
        token=row["name"],
        workspace=row["workspace"],
        scope=Scope.parse(row["scope"]),
        policy=row["policy"],
        expires_at=row["expires_at"],
        bootstrap=bool(row["bootstrap"]),
    )


def _token_row(r: Any) -> dict[str, Any]:
    return {
        "name": r["name"],
        "scope": r["scope"],
        "policy": r["policy"],
        "created_at": r["created_at"],
        "expires_at": r["expires_at"],
        "revoked_at": r["revoked_at"],
        "bootstrap": bool(r["bootstrap"]),
    }
