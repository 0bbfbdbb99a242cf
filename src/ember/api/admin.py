"""The /v1 endpoints of tenancy: workspaces, tokens, usage policies, secrets, audit, doctor.

Every change here is audited; nothing here returns a secret value or a stored token.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from ember.api import schemas
from ember.api.auth import (
    Principal,
    Scope,
    Tokens,
    need_admin,
    need_deploy,
    need_read,
    new_token,
    token_hash,
)
from ember.api.errors import ApiException
from ember.api.routes import _body, _time, audit, json_body, plane
from ember.config import TOKEN_FILE
from ember.control.plane import ConflictError, NotFoundError
from ember.core.budgets import PolicyError, make_policy
from ember.core.names import HANDLE_RE
from ember.core.posture import FileFact, FunctionFact, Posture, TokenFact, check
from ember.core.secrets import SecretError, validate_secret, validate_secret_name
from ember.store import tables
from ember.store.writer import execute

router = APIRouter(prefix="/v1", responses=schemas.ERRORS)

MAX_EXPIRES_S = 10 * 365 * 86400.0


def tokens_of(request: Request) -> Tokens:
    t: Tokens = request.app.state.auth.tokens
    return t


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not HANDLE_RE.fullmatch(value):
        raise ApiException(
            422,
            "invalid_request",
            f"{what} name {value!r} must be 1-64 characters of letters, digits, '_', '.', '-'",
        )
    return value


def _object(body: Any, allowed: set[str], example: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiException(422, "invalid_request", f"the body must be a JSON object: {example}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiException(
            422,
            "invalid_request",
            f"unexpected field {unknown[0]!r}; the fields are {', '.join(sorted(allowed))}",
        )
    return body


# ----------------------------------------------------------------------------- workspaces
@router.post(
    "/workspaces",
    status_code=201,
    response_model=schemas.WorkspaceCreated,
    openapi_extra=_body(schemas.WorkspaceRequest),
)
async def create_workspace(request: Request, who: Principal = Depends(need_admin)) -> Response:
    """Create a workspace and its first admin token (shown once). The server operator only."""
    if not who.operator:
        raise ApiException(
            403, "forbidden", "only an admin of the default workspace can create workspaces"
        )
    body = _object(await json_body(request), {"name"}, '{"name": "search"}')
    name = _name(body.get("name"), "workspace")
    cp = plane(request)
    token, now = new_token(), time.time()

    def exists() -> bool:
        w = tables.workspaces.c
        with cp.engine.connect() as conn:
            return conn.execute(select(w.name).where(w.name == name)).first() is not None

    if await asyncio.to_thread(exists):
        audit(request, who, "workspace.create", "conflict", name)
        raise ApiException(409, "conflict", f"workspace {name!r} exists")

    def write(conn: Connection) -> None:
        conn.execute(insert(tables.workspaces).values(name=name, created_at=now))
        conn.execute(
            insert(tables.tokens).values(
                name="admin",
                hash=token_hash(token),
                created_at=now,
                workspace=name,
                scope=Scope.ADMIN.label,
            )
        )

    try:
        await cp.writer.submit(write)  # one transaction: the workspace and its admin token
    except IntegrityError:  # created by a concurrent request since the check
        audit(request, who, "workspace.create", "conflict", name)
        raise ApiException(409, "conflict", f"workspace {name!r} exists") from None
    tokens_of(request).add(
        token_hash(token), Principal(token="admin", workspace=name, scope=Scope.ADMIN)
    )
    audit(request, who, "workspace.create", "ok", name)
    return JSONResponse(
        {"workspace": name, "token_name": "admin", "scope": "admin", "token": token},
        status_code=201,
    )


@router.get("/workspaces", response_model=schemas.Workspaces)
async def list_workspaces(request: Request, who: Principal = Depends(need_admin)) -> Response:
    """Every workspace for the server operator; a workspace's own tokens see only it."""

    def read() -> list[dict[str, Any]]:
        w = tables.workspaces.c
        q = select(w.name, w.created_at).order_by(w.name)
        if not who.operator:
            q = q.where(w.name == who.workspace)
        with plane(request).engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    return JSONResponse({"workspaces": await asyncio.to_thread(read)})


# ----------------------------------------------------------------------------- tokens
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


def _expires_in(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ApiException(
            422,
            "invalid_request",
            f"expires_in must be a positive number of seconds, not {value!r}",
        )
    if value > MAX_EXPIRES_S:
        raise ApiException(422, "invalid_request", "expires_in is at most ten years")
    return float(value)


@router.post(
    "/tokens",
    status_code=201,
    response_model=schemas.TokenCreated,
    openapi_extra=_body(schemas.TokenRequest),
)
async def create_token(request: Request, who: Principal = Depends(need_admin)) -> Response:
    """A new token of the caller's workspace; its value is in this answer only."""
    body = _object(
        await json_body(request),
        {"name", "scope", "policy", "expires_in"},
        '{"name": "ci", "scope": "deploy"}',
    )
    name = _name(body.get("name"), "token")
    try:
        scope = Scope.parse(body.get("scope", "read"))
    except ValueError as exc:
        raise ApiException(422, "invalid_request", str(exc)) from None
    policy = body.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise ApiException(
            422, "invalid_request", f"policy must be the name of a policy, not {policy!r}"
        )
    cp = plane(request)
    if policy is not None and (who.workspace, policy) not in cp.policies.policies:
        have = ", ".join(p.name for p in cp.policies.of(who.workspace)) or "none"
        raise ApiException(
            422, "invalid_request", f"no policy named {policy!r} (this workspace has: {have})"
        )
    ttl = _expires_in(body.get("expires_in"))
    if any(p.workspace == who.workspace and p.token == name for p in tokens_of(request).live()):
        raise ApiException(
            409, "conflict", f"a live token named {name!r} exists; revoke it first or pick another"
        )
    token, now = new_token(), time.time()
    expires_at = now + ttl if ttl is not None else None
    digest = token_hash(token)
    row = {
        "name": name,
        "hash": digest,
        "created_at": now,
        "workspace": who.workspace,
        "scope": scope.label,
        "policy": policy,
        "expires_at": expires_at,
    }
    # Known before the write is awaited: a concurrent create of the same name sees it (409).
    tokens_of(request).add(digest, Principal(name, who.workspace, scope, policy, expires_at))
    try:
        await cp.writer.submit(execute(insert(tables.tokens), row))
    except Exception:
        tokens_of(request).remove(who.workspace, name)
        raise
    audit(request, who, "token.create", "ok", name, {"scope": scope.label, "policy": policy})
    return JSONResponse(
        {
            "name": name,
            "scope": scope.label,
            "policy": policy,
            "created_at": now,
            "expires_at": expires_at,
            "token": token,
        },
        status_code=201,
    )


@router.get("/tokens", response_model=schemas.TokenList)
async def list_tokens(request: Request, who: Principal = Depends(need_admin)) -> Response:
    """The workspace's tokens, revoked ones included; never their values."""

    def read() -> list[dict[str, Any]]:
        t = tables.tokens.c
        q = select(tables.tokens).where(t.workspace == who.workspace).order_by(t.created_at)
        with plane(request).engine.connect() as conn:
            return [_token_row(r) for r in conn.execute(q).mappings()]

    return JSONResponse({"tokens": await asyncio.to_thread(read)})


@router.delete("/tokens/{name}", response_model=schemas.Revoked)
async def revoke_token(
    request: Request, name: str, who: Principal = Depends(need_admin)
) -> Response:
    """Revoke a token at once; it is kept, revoked, for the audit trail."""
    live = [
        p for p in tokens_of(request).live() if p.workspace == who.workspace and p.token == name
    ]
    if not live:
        raise ApiException(404, "token_not_found", f"no live token named {name!r}")
    now = time.time()
    t = tables.tokens.c
    await plane(request).writer.submit(
        execute(
            update(tables.tokens)
            .where(t.workspace == who.workspace, t.name == name, t.revoked_at.is_(None))
            .values(revoked_at=now)
        )
    )
    tokens_of(request).remove(who.workspace, name)
    audit(request, who, "token.revoke", "ok", name)
    return JSONResponse({"name": name, "revoked_at": now})


# ----------------------------------------------------------------------------- policies
@router.post(
    "/policies",
    status_code=201,
    response_model=schemas.PolicyStatus,
    openapi_extra=_body(schemas.PolicyRequest),
)
async def create_policy(request: Request, who: Principal = Depends(need_admin)) -> Response:
    """A usage policy: tags for the usage of its tokens' calls, a budget, GPU limits."""
    fields = set(schemas.PolicyRequest.model_fields)
    body = _object(
        await json_body(request), fields, '{"name": "search", "budget_usd": 50, "action": "block"}'
    )
    try:
        rules = make_policy(**body)
    except PolicyError as exc:
        raise ApiException(422, "invalid_policy", str(exc)) from None
    except TypeError:
        raise ApiException(422, "invalid_policy", "a policy needs a name") from None
    try:
        result = await plane(request).create_policy(who.workspace, rules)
    except ConflictError as exc:
        audit(request, who, "policy.create", "conflict", rules.name)
        raise ApiException(409, "conflict", str(exc)) from None
    audit(request, who, "policy.create", "ok", rules.name, rules.to_dict())
    return JSONResponse(result, status_code=201)


def _shown(status: dict[str, Any], who: Principal) -> dict[str, Any]:
    """A webhook URL is often a credential (a chat hook): only admins see it."""
    if status.get("webhook") and who.scope < Scope.ADMIN:
        status["webhook"] = "(set; shown to admins)"
    return status


@router.get("/policies", response_model=schemas.PolicyList)
async def list_policies(request: Request, who: Principal = Depends(need_read)) -> Response:
    """The workspace's policies with what each has spent this period."""
    cp = plane(request)  # spend is in memory, open worker segments included: no store read
    return JSONResponse(
        {
            "policies": [
                _shown(cp.policy_status(who.workspace, p), who)
                for p in cp.policies.of(who.workspace)
            ]
        }
    )


@router.get("/policies/{name}", response_model=schemas.PolicyStatus)
async def get_policy(request: Request, name: str, who: Principal = Depends(need_read)) -> Response:
    cp = plane(request)
    rules = cp.policies.policies.get((who.workspace, name))
    if rules is None:
        raise ApiException(404, "policy_not_found", f"no policy named {name!r}")
    return JSONResponse(_shown(cp.policy_status(who.workspace, rules), who))


@router.delete("/policies/{name}", response_model=schemas.Deleted)
async def delete_policy(
    request: Request, name: str, who: Principal = Depends(need_admin)
) -> Response:
    """Delete a policy; its tokens must be revoked first (their calls would lose their rules)."""
    cp = plane(request)
    if (who.workspace, name) not in cp.policies.policies:
        raise ApiException(404, "policy_not_found", f"no policy named {name!r}")
    bound = sorted(
        p.token
        for p in tokens_of(request).live()
        if p.workspace == who.workspace and p.policy == name
    )
    if bound:
        raise ApiException(
            409,
            "conflict",
            f"policy {name!r} is bound to tokens {', '.join(bound)}; revoke them first",
        )
    await cp.delete_policy(who.workspace, name)
    audit(request, who, "policy.delete", "ok", name)
    return JSONResponse({"name": name, "deleted": True})


# ----------------------------------------------------------------------------- secrets
def _secret_item(cp: Any, workspace: str, name: str, row: Any) -> dict[str, Any]:
    return {
        "name": name,
        "keys": json.loads(row["keys"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "used_by": cp.users_of_secret(workspace, name),
    }


def _secret_rows(request: Request, workspace: str, name: str | None = None) -> list[Any]:
    s = tables.secrets.c
    q = select(s.name, s["keys"], s.created_at, s.updated_at).where(s.workspace == workspace)
    if name is not None:
        q = q.where(s.name == name)
    with plane(request).engine.connect() as conn:
        return list(conn.execute(q.order_by(s.name)).mappings())


@router.put(
    "/secrets/{name}",
    response_model=schemas.SecretInfo,
    openapi_extra=_body(schemas.SecretRequest),
)
async def set_secret(request: Request, name: str, who: Principal = Depends(need_admin)) -> Response:
    """Create or replace a secret; stored encrypted, its values never come back."""
    body = _object(await json_body(request), {"values"}, '{"values": {"HF_TOKEN": "..."}}')
    try:
        values = validate_secret(name, body.get("values"))
    except SecretError as exc:
        audit(request, who, "secret.set", "invalid", name[:64])
        raise ApiException(422, "invalid_secret", str(exc)) from None
    cp = plane(request)
    await cp.set_secret(who.workspace, name, values)
    audit(request, who, "secret.set", "ok", name, {"keys": sorted(values)})
    rows = await asyncio.to_thread(_secret_rows, request, who.workspace, name)
    return JSONResponse(_secret_item(cp, who.workspace, name, rows[0]))


@router.get("/secrets", response_model=schemas.SecretList)
async def list_secrets(request: Request, who: Principal = Depends(need_deploy)) -> Response:
    """Names and keys of the workspace's secrets, and the functions using each."""
    cp = plane(request)
    rows = await asyncio.to_thread(_secret_rows, request, who.workspace)
    return JSONResponse({"secrets": [_secret_item(cp, who.workspace, r["name"], r) for r in rows]})


@router.get("/secrets/{name}", response_model=schemas.SecretInfo)
async def get_secret(
    request: Request, name: str, who: Principal = Depends(need_deploy)
) -> Response:
    cp = plane(request)
    rows = await asyncio.to_thread(_secret_rows, request, who.workspace, name)
    if not rows:
        raise ApiException(404, "secret_not_found", f"no secret named {name!r}")
    return JSONResponse(_secret_item(cp, who.workspace, name, rows[0]))


@router.delete("/secrets/{name}", response_model=schemas.Deleted)
async def delete_secret(
    request: Request, name: str, who: Principal = Depends(need_admin)
) -> Response:
    try:
        validate_secret_name(name)
        await plane(request).delete_secret(who.workspace, name)
    except SecretError as exc:
        raise ApiException(404, "secret_not_found", str(exc)) from None
    except NotFoundError as exc:
        raise ApiException(404, exc.code, exc.message) from None
    except ConflictError as exc:
        audit(request, who, "secret.delete", "conflict", name)
        raise ApiException(409, "conflict", str(exc)) from None
    audit(request, who, "secret.delete", "ok", name)
    return JSONResponse({"name": name, "deleted": True})


# ----------------------------------------------------------------------------- audit
@router.get("/audit", response_model=schemas.AuditEvents)
async def read_audit(
    request: Request,
    since: str | None = Query(None, description="epoch seconds or ISO 8601"),
    until: str | None = Query(None, description="epoch seconds or ISO 8601"),
    limit: int = Query(1000, ge=1, le=100_000),
    who: Principal = Depends(need_admin),
) -> Response:
    """The workspace's audit trail, oldest first (the operator also sees refused requests that
    carried no valid token)."""
    cp = plane(request)
    await cp.flush()
    events = await asyncio.to_thread(
        cp.audit.read,
        who.workspace,
        _time(since, "since"),
        _time(until, "until"),
        limit,
        unattributed=who.operator,
    )
    return JSONResponse({"events": events})


# ----------------------------------------------------------------------------- doctor
def _file(path: Any, what: str) -> list[FileFact]:
    try:
        return [FileFact(str(path), stat.S_IMODE(os.stat(path).st_mode), what)]
    except OSError:
        return []


@router.get("/doctor", response_model=schemas.Findings)
async def doctor(request: Request, who: Principal = Depends(need_admin)) -> Response:
    """Risky settings of this server and workspace, each with how to fix it."""
    cp = plane(request)
    settings = cp.settings
    mine = None if who.operator else who.workspace  # the operator checks the whole server
    tokens = [
        TokenFact(p.workspace, p.token, p.scope.label, p.expires_at, p.bootstrap)
        for p in tokens_of(request).live()
        if mine is None or p.workspace == mine
    ]
    functions = [
        FunctionFact(app.workspace, app.name, meta.name, meta.spec.timeout)
        for app in cp.apps.values()
        if mine is None or app.workspace == mine
        for meta in app.functions.values()
    ]
    workspaces = [who.workspace]
    if who.operator:

        def every_workspace() -> list[str]:
            with cp.engine.connect() as conn:
                return list(conn.execute(select(tables.workspaces.c.name)).scalars())

        workspaces = await asyncio.to_thread(every_workspace)
    budgeted = frozenset(
        ws for (ws, _), p in cp.policies.policies.items() if p.budget_usd is not None
    )
    files: list[FileFact] = []
    if who.operator:
        files += _file(settings.data_dir, "data dir")
        files += _file(settings.data_dir / TOKEN_FILE, "token file")
        files += _file(settings.data_dir / "ember.db", "database")
        if cp.vault.key_path is not None:
            files += _file(cp.vault.key_path, "master key")
    findings = check(
        Posture(
            # Where the server listens is the operator's business, like its files.
            host=settings.host if who.operator else "127.0.0.1",
            tls=settings.tls,
            tokens=tuple(tokens),
            files=tuple(files),
            functions=tuple(functions),
            workspaces=tuple(workspaces),
            budgeted_workspaces=budgeted,
        )
    )
    return JSONResponse({"findings": [f.to_dict() for f in findings]})
