"""The /v1 endpoints of governance: usage policies, secrets, audit, doctor (workspaces and
tokens are in `tenancy`).

Every change here is audited; nothing here returns a secret value or a stored token.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ember.api import schemas
from ember.api.auth import Principal, Scope, need_admin, need_deploy, need_read
from ember.api.bodies import audit, json_body, openapi_body, plane
from ember.api.errors import ApiException
from ember.api.responses import JSONResponse
from ember.api.routes import _time
from ember.api.tenancy import _object
from ember.config import TOKEN_FILE
from ember.control.errors import ConflictError, NotFoundError
from ember.core.budgets import PolicyError, make_policy
from ember.core.posture import FileFact, FunctionFact, Posture, TokenFact, check
from ember.core.secrets import SecretError, validate_secret, validate_secret_name

router = APIRouter(prefix="/v1", responses=schemas.ERRORS)


# ----------------------------------------------------------------------------- policies
@router.post(
    "/policies",
    status_code=201,
    response_model=schemas.PolicyStatus,
    openapi_extra=openapi_body(schemas.PolicyRequest),
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
        result = await plane(request).governance.create(who.workspace, rules)
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
                _shown(cp.governance.status(who.workspace, p), who)
                for p in cp.governance.policies.of(who.workspace)
            ]
        }
    )


@router.get("/policies/{name}", response_model=schemas.PolicyStatus)
async def get_policy(request: Request, name: str, who: Principal = Depends(need_read)) -> Response:
    cp = plane(request)
    rules = cp.governance.policies.policies.get((who.workspace, name))
    if rules is None:
        raise ApiException(404, "policy_not_found", f"no policy named {name!r}")
    return JSONResponse(_shown(cp.governance.status(who.workspace, rules), who))


@router.delete("/policies/{name}", response_model=schemas.Deleted)
async def delete_policy(
    request: Request, name: str, who: Principal = Depends(need_admin)
) -> Response:
    """Delete a policy; its tokens must be revoked first (their calls would lose their rules)."""
    cp = plane(request)
    if (who.workspace, name) not in cp.governance.policies.policies:
        raise ApiException(404, "policy_not_found", f"no policy named {name!r}")
    bound = cp.tokens.bound(who.workspace, name)
    if bound:
        raise ApiException(
            409,
            "conflict",
            f"policy {name!r} is bound to tokens {', '.join(bound)}; revoke them first",
        )
    await cp.governance.delete(who.workspace, name)
    audit(request, who, "policy.delete", "ok", name)
    return JSONResponse({"name": name, "deleted": True})


# ----------------------------------------------------------------------------- secrets
def _secret_item(cp: Any, workspace: str, name: str, row: Any) -> dict[str, Any]:
    return {
        "name": name,
        "keys": json.loads(row["keys"]),
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "used_by": cp.deployments.users_of_secret(workspace, name),
    }


@router.put(
    "/secrets/{name}",
    response_model=schemas.SecretInfo,
    openapi_extra=openapi_body(schemas.SecretRequest),
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
    rows = await asyncio.to_thread(cp.secrets.rows, who.workspace, name)
    return JSONResponse(_secret_item(cp, who.workspace, name, rows[0]))


@router.get("/secrets", response_model=schemas.SecretList)
async def list_secrets(request: Request, who: Principal = Depends(need_deploy)) -> Response:
    """Names and keys of the workspace's secrets, and the functions using each."""
    cp = plane(request)
    rows = await asyncio.to_thread(cp.secrets.rows, who.workspace)
    return JSONResponse({"secrets": [_secret_item(cp, who.workspace, r["name"], r) for r in rows]})


@router.get("/secrets/{name}", response_model=schemas.SecretInfo)
async def get_secret(
    request: Request, name: str, who: Principal = Depends(need_deploy)
) -> Response:
    cp = plane(request)
    rows = await asyncio.to_thread(cp.secrets.rows, who.workspace, name)
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
        for p in cp.tokens.live(mine)
    ]
    functions = [
        FunctionFact(app.workspace, app.name, meta.name, meta.spec.timeout)
        for app in cp.deployments.apps.values()
        if mine is None or app.workspace == mine
        for meta in app.functions.values()
    ]
    workspaces = [who.workspace]
    if who.operator:
        workspaces = [w["name"] for w in await cp.tokens.workspaces()]
    budgeted = frozenset(
        ws for (ws, _), p in cp.governance.policies.policies.items() if p.budget_usd is not None
    )
    files: list[FileFact] = []
    if who.operator:
        files += _file(settings.data_dir, "data dir")
        files += _file(settings.data_dir / TOKEN_FILE, "token file")
        files += _file(settings.data_dir / "ember.db", "database")
        if cp.secrets.vault.key_path is not None:
            files += _file(cp.secrets.vault.key_path, "master key")
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
            unsandboxed_why=cp.unsandboxed_why,
            tenant_isolation=settings.tenant_isolation,
        )
    )
    return JSONResponse({"findings": [f.to_dict() for f in findings]})
