"""The /v1 endpoints of workspaces and their tokens; the state is the token room's
(`ember.control.tokens`).

Every change here is audited; nothing here returns a stored token (a new one is shown once).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ember.api import schemas
from ember.api.auth import Principal, Scope, need_admin
from ember.api.bodies import audit, json_body, openapi_body, plane
from ember.api.errors import ApiException
from ember.api.responses import JSONResponse
from ember.control.errors import ConflictError, NotFoundError
from ember.control.tokens import TokenRefused
from ember.core.names import HANDLE_RE, HANDLE_RULE

router = APIRouter(prefix="/v1", responses=schemas.ERRORS)

MAX_EXPIRES_S = 10 * 365 * 86400.0


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not HANDLE_RE.fullmatch(value):
        raise ApiException(
            422,
            "invalid_request",
            f"{what} name {value!r} must be {HANDLE_RULE}",
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
    openapi_extra=openapi_body(schemas.WorkspaceRequest),
)
async def create_workspace(request: Request, who: Principal = Depends(need_admin)) -> Response:
    """Create a workspace and its first admin token (shown once). The server operator only."""
    if not who.operator:
        raise ApiException(
            403, "forbidden", "only an admin of the default workspace can create workspaces"
        )
    body = _object(await json_body(request), {"name"}, '{"name": "search"}')
    name = _name(body.get("name"), "workspace")
    try:
        token = await plane(request).tokens.create_workspace(name, by=who)
    except TokenRefused as exc:
        audit(request, who, "workspace.create", "refused", name, {"reason": str(exc)[:300]})
        raise ApiException(403, "forbidden", str(exc)) from None
    except ConflictError as exc:
        audit(request, who, "workspace.create", "conflict", name)
        raise ApiException(409, "conflict", str(exc)) from None
    audit(request, who, "workspace.create", "ok", name)
    return JSONResponse(
        {"workspace": name, "token_name": "admin", "scope": "admin", "token": token},
        status_code=201,
    )


@router.get("/workspaces", response_model=schemas.Workspaces)
async def list_workspaces(request: Request, who: Principal = Depends(need_admin)) -> Response:
    """Every workspace for the server operator; a workspace's own tokens see only it."""
    only = None if who.operator else who.workspace
    return JSONResponse({"workspaces": await plane(request).tokens.workspaces(only)})


# ----------------------------------------------------------------------------- tokens
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
    openapi_extra=openapi_body(schemas.TokenRequest),
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
    if policy is not None and (who.workspace, policy) not in cp.governance.policies.policies:
        have = ", ".join(p.name for p in cp.governance.policies.of(who.workspace)) or "none"
        raise ApiException(
            422, "invalid_request", f"no policy named {policy!r} (this workspace has: {have})"
        )
    ttl = _expires_in(body.get("expires_in"))
    try:
        issued = await cp.tokens.create(who.workspace, name, scope, policy, ttl, by=who)
    except TokenRefused as exc:
        audit(request, who, "token.create", "refused", name, {"reason": str(exc)[:300]})
        raise ApiException(403, "forbidden", str(exc)) from None
    except ConflictError as exc:
        raise ApiException(409, "conflict", str(exc)) from None
    audit(request, who, "token.create", "ok", name, {"scope": scope.label, "policy": policy})
    return JSONResponse(
        {
            "name": name,
            "scope": scope.label,
            "policy": policy,
            "created_at": issued.created_at,
            "expires_at": issued.who.expires_at,
            "token": issued.token,
        },
        status_code=201,
    )


@router.get("/tokens", response_model=schemas.TokenList)
async def list_tokens(request: Request, who: Principal = Depends(need_admin)) -> Response:
    """The workspace's tokens, revoked ones included; never their values."""
    return JSONResponse({"tokens": await plane(request).tokens.tokens(who.workspace)})


@router.delete("/tokens/{name}", response_model=schemas.Revoked)
async def revoke_token(
    request: Request, name: str, who: Principal = Depends(need_admin)
) -> Response:
    """Revoke a token at once; it is kept, revoked, for the audit trail."""
    try:
        when = await plane(request).tokens.revoke(who.workspace, name)
    except NotFoundError as exc:
        raise ApiException(404, exc.code, exc.message) from None
    audit(request, who, "token.revoke", "ok", name)
    return JSONResponse({"name": name, "revoked_at": when})
