"""Code bundles and Envs over HTTP: what `ember deploy` uploads and builds before it deploys.

HEAD /v1/bundles/{digest}       is this bundle here? (a redeploy of unchanged code skips it)
PUT  /v1/bundles/{digest}       upload a bundle (a zip; its sha256 is the digest)
POST /v1/envs                   build an Env, or find it built: {"spec": {...}}
GET  /v1/envs[/{id}]            built Envs, with the app versions using each
GET  /v1/envs/{id}/lock         its lock, as a requirements file with hashes
DELETE /v1/envs                 prune: remove the Envs no deployed version uses
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import PlainTextResponse, Response

from ember.api import schemas
from ember.api.auth import Principal, need_deploy, need_read
from ember.api.bodies import audit, json_body, openapi_body, plane
from ember.api.errors import ApiException
from ember.api.responses import JSONResponse
from ember.control import views
from ember.control.environments import EnvError
from ember.envs.bundle import BundleError

router = APIRouter(prefix="/v1", responses=schemas.ERRORS)

DIGEST = Path(description="the bundle's sha256, in hex (64 digits)")
ENV_ID = Path(description="an Env id (`env-` and 16 hex digits), as `POST /v1/envs` gave it")
_BUNDLE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.head("/bundles/{digest}", response_class=Response)
@router.get("/bundles/{digest}", response_model=schemas.BundleInfo)
async def get_bundle(
    request: Request, digest: str = DIGEST, who: Principal = Depends(need_read)
) -> Response:
    if not plane(request).deployments.has_bundle(who.workspace, digest):
        raise ApiException(404, "bundle_not_found", f"no bundle {digest[:12]}... here yet")
    return JSONResponse({"digest": digest})


@router.put(
    "/bundles/{digest}",
    status_code=201,
    response_model=schemas.BundleInfo,
    openapi_extra=_BUNDLE_BODY,
)
async def put_bundle(
    request: Request, digest: str = DIGEST, who: Principal = Depends(need_deploy)
) -> Response:
    """Upload the app's code: a zip whose sha256 is `digest`, checked as untrusted input."""
    data = await request.body()
    try:
        info = await plane(request).deployments.put_bundle(who.workspace, digest, data)
    except BundleError as exc:
        raise ApiException(422, "invalid_bundle", str(exc)) from None
    return JSONResponse(info, status_code=201)


@router.post(
    "/envs",
    response_model=schemas.EnvView,
    openapi_extra=openapi_body(schemas.EnvRequest),
    responses={202: {"model": schemas.EnvView, "description": "building: poll GET ?build=1"}},
)
async def build_env(request: Request, who: Principal = Depends(need_deploy)) -> Response:
    """Find the Env a spec describes, or start building it (202, then poll its id)."""
    body = await json_body(request)
    spec = body.get("spec") if isinstance(body, dict) else None
    if spec is None:
        raise ApiException(422, "invalid_env", "send {'spec': {...}}, as ember.Env describes it")
    try:
        view = plane(request).environments.request(who.workspace, spec)
    except EnvError as exc:
        audit(request, who, "env.build", "invalid", None, {"error": str(exc)[:300]})
        raise ApiException(422, "invalid_env", str(exc)) from None
    if view["status"] == "building":
        audit(request, who, "env.build", "ok", view["id"])
    return JSONResponse(view, status_code=200 if view["status"] == "ready" else 202)


def _with_users(request: Request, workspace: str, view: dict[str, Any]) -> dict[str, Any]:
    users = views.env_users(plane(request).apps_of(workspace))
    return {**view, "used_by": users.get(view["id"], [])}


@router.get("/envs", response_model=schemas.EnvList)
async def list_envs(request: Request, who: Principal = Depends(need_read)) -> Response:
    cp = plane(request)
    users = views.env_users(cp.apps_of(who.workspace))
    envs = [{**r.view(), "used_by": users.get(r.id, [])} for r in cp.environments.of(who.workspace)]
    return JSONResponse({"envs": envs})


def _view(request: Request, workspace: str, env_id: str, builds: bool) -> dict[str, Any]:
    view = plane(request).environments.view(workspace, env_id, with_builds=builds)
    if view is None:
        raise ApiException(
            404, "env_not_found", f"no Env {env_id} in this workspace (see `ember env list`)"
        )
    return view


@router.get("/envs/{env_id}", response_model=schemas.EnvView)
async def get_env(
    request: Request,
    env_id: str = ENV_ID,
    build: bool = Query(False, description="also an Env still building, or failed"),
    who: Principal = Depends(need_read),
) -> Response:
    view = _view(request, who.workspace, env_id, build)
    return JSONResponse(_with_users(request, who.workspace, view))


_JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {
        "description": r["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    for code, r in schemas.ERRORS.items()
}
"""The lock is text; its errors, like every other, are JSON."""


@router.get(
    "/envs/{env_id}/lock",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **_JSON_ERRORS},
)
async def export_env(
    request: Request, env_id: str = ENV_ID, who: Principal = Depends(need_read)
) -> Response:
    """The Env's lock, a requirements file with every version and hash: `Env.from_lock`."""
    _view(request, who.workspace, env_id, False)
    record = plane(request).environments.records[(who.workspace, env_id)]
    header = f"# ember env export {env_id}: rebuild it with ember.Env.from_lock(path)\n"
    return PlainTextResponse(header + record.lock)


@router.delete("/envs", response_model=schemas.EnvPruned)
async def prune_envs(
    request: Request,
    dry_run: bool = Query(False, description="say what would go, remove nothing"),
    who: Principal = Depends(need_deploy),
) -> Response:
    cp = plane(request)
    in_use = set(views.env_users(cp.apps_of(who.workspace)))
    removed = await cp.environments.prune(who.workspace, in_use, dry_run)
    if removed and not dry_run:
        audit(request, who, "env.prune", "ok", None, {"removed": removed})
    return JSONResponse({"removed": removed, "dry_run": dry_run})
