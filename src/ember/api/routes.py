"""The /v1 endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ember.api import schemas
from ember.api.errors import ApiException
from ember.control.manifest import DeployError
from ember.control.plane import ControlPlane, NotFoundError, UnplaceableError
from ember.control.records import InputError, Job

router = APIRouter(prefix="/v1", responses=schemas.ERRORS)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """Document a JSON body that the handler parses itself (for its own 400/422 messages)."""
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}}}


def plane(request: Request) -> ControlPlane:
    cp: ControlPlane = request.app.state.plane
    return cp


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        value = json.loads(raw.decode("utf-8-sig"), parse_constant=_no_constant)
        if _SURROGATE_ESCAPE.search(raw):  # rare: only then look for a lone surrogate
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:
        raise ApiException(
            400, "invalid_json", f"request body is not valid UTF-8 text: {exc.reason}"
        ) from None
    except RecursionError:
        raise ApiException(400, "invalid_json", "request body is nested too deeply") from None
    except ValueError as exc:
        raise ApiException(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    return value


def _not_found(exc: NotFoundError) -> ApiException:
    return ApiException(404, exc.code, exc.message)


async def _input_of(request: Request) -> Any:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiException(422, "invalid_input", 'the body must be a JSON object: {"input": {...}}')
    unknown = set(body) - {"input"}
    if unknown:
        raise ApiException(
            422,
            "invalid_input",
            f"unexpected field {sorted(unknown)[0]!r}: "
            'the body is {"input": {...keyword arguments...}}',
        )
    return body.get("input", {})


def _submit(request: Request, app: str, fn: str, input: Any) -> tuple[Job, asyncio.Future[None]]:
    try:
        return plane(request).submit(app, fn, input)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    except InputError as exc:
        raise ApiException(422, "invalid_input", str(exc)) from None
    except UnplaceableError as exc:
        raise ApiException(422, "no_fitting_gpu", str(exc)) from None
    except RecursionError:
        raise ApiException(422, "invalid_input", "input is nested too deeply") from None


@router.post(
    "/apps/{app}/{fn}/run",
    status_code=202,
    response_model=schemas.Accepted,
    openapi_extra=_body(schemas.RunRequest),
)
async def run(request: Request, app: str, fn: str) -> Response:
    """Queue a job; it is durable before this answers."""
    job, durable = _submit(request, app, fn, await _input_of(request))
    await durable
    return JSONResponse({"id": job.id, "status": "IN_QUEUE"}, status_code=202)


@router.post(
    "/apps/{app}/{fn}/runsync",
    response_model=schemas.JobBody,
    openapi_extra=_body(schemas.RunRequest),
)
async def runsync(
    request: Request,
    app: str,
    fn: str,
    wait: float = Query(60.0, ge=0, le=3600, description="seconds to wait before answering 202"),
) -> Response:
    """Run a job and answer with its body once it ends, or 202 after `wait` seconds."""
    job, durable = _submit(request, app, fn, await _input_of(request))
    try:
        await asyncio.wait_for(job.done.wait(), wait)
    except TimeoutError:
        await durable
        return JSONResponse(job.body(), status_code=202)
    return JSONResponse(job.body())


async def _job(request: Request, job_id: str) -> Job | dict[str, Any]:
    try:
        return await plane(request).get_job(job_id)
    except NotFoundError as exc:
        raise _not_found(exc) from None


@router.get("/jobs/{job_id}", response_model=schemas.JobBody)
async def get_job(
    request: Request,
    job_id: str,
    wait: float = Query(0.0, ge=0, le=300, description="wait up to this long for the job to end"),
) -> Response:
    job = await _job(request, job_id)
    if isinstance(job, dict):
        return JSONResponse(job)
    if wait > 0 and not job.status.terminal:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.done.wait(), wait)
    return JSONResponse(job.body())


@router.post("/jobs/{job_id}/cancel", response_model=schemas.JobBody)
async def cancel_job(request: Request, job_id: str) -> Response:
    """Cancel a queued or running job; running code is interrupted, or its worker stopped."""
    job = await _job(request, job_id)
    if isinstance(job, dict):
        return JSONResponse(job)
    plane(request).cancel(job)
    return JSONResponse(job.body())


def _event(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


@router.get(
    "/jobs/{job_id}/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_job(request: Request, job_id: str) -> StreamingResponse:
    """Server-sent events: one `output` per yielded value, then `done` with the job body."""
    job = await _job(request, job_id)

    async def events() -> AsyncIterator[bytes]:
        if isinstance(job, dict):
            if job["status"] == "COMPLETED" and isinstance(job["output"], list):
                for value in job["output"]:
                    yield _event("output", value)
            yield _event("done", job)
            return
        sent = 0
        while True:
            changed = job.changed
            while sent < len(job.outputs):
                yield _event("output", job.outputs[sent])
                sent += 1
            if job.status.terminal:
                yield _event("done", job.body())
                return
            await changed.wait()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
    )


@router.post(
    "/apps",
    status_code=201,
    response_model=schemas.Deployed,
    openapi_extra=_body(schemas.DeployRequest),
)
async def deploy(request: Request) -> Response:
    """Deploy (or redeploy) an app: a new immutable version; old workers drain."""
    try:
        result = await plane(request).deploy(await json_body(request))
    except DeployError as exc:
        raise ApiException(422, "invalid_deploy", str(exc)) from None
    return JSONResponse(result, status_code=201)


@router.get("/apps")
async def list_apps(request: Request) -> Response:
    apps = [a.describe() for a in sorted(plane(request).apps.values(), key=lambda a: a.name)]
    return JSONResponse({"apps": apps})


@router.get("/apps/{app}")
async def get_app(request: Request, app: str) -> Response:
    try:
        state, _ = plane(request).lookup(app)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    return JSONResponse(state.describe())


@router.get("/apps/{app}/{fn}/health", response_model=schemas.Health)
async def health(request: Request, app: str, fn: str) -> Response:
    try:
        return JSONResponse(plane(request).health(app, fn))
    except NotFoundError as exc:
        raise _not_found(exc) from None


@router.get("/apps/{app}/{fn}/logs")
async def logs(
    request: Request,
    app: str,
    fn: str,
    tail: int = Query(100, ge=0, le=100_000),
    since: float = Query(0.0, ge=0),
) -> Response:
    """Worker output of a function, each line with its job id."""
    cp = plane(request)
    try:
        cp.lookup(app, fn)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    lines = await asyncio.to_thread(cp.logs.read, app, fn, tail=tail, since=since)
    return JSONResponse({"lines": lines})


@router.get("/workers")
async def workers(request: Request) -> Response:
    return JSONResponse({"workers": [w.describe() for w in plane(request).workers.values()]})


@router.get("/nodes")
async def nodes(request: Request) -> Response:
    """GPUs of each node (simulated ones are labelled), and the workers on each."""
    return JSONResponse({"nodes": plane(request).nodes()})


def _time(value: str | None, name: str) -> float | None:
    """Epoch seconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ApiException(
            422, "invalid_request", f"{name}={value!r} is neither epoch seconds nor ISO 8601"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@router.get("/usage")
async def usage(
    request: Request,
    group_by: str = Query(
        "app", description="comma-separated: app, function, gpu, phase, tag:NAME"
    ),
    since: str | None = Query(None, description="epoch seconds or ISO 8601"),
    until: str | None = Query(None, description="epoch seconds or ISO 8601"),
    granularity: str | None = Query(None, description="hour or day: one group per bucket"),
) -> Response:
    """Metered usage and cost per group; `idle_fraction` is the share of GPU money spent waiting."""
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    try:
        result = await plane(request).usage(
            groups, _time(since, "since"), _time(until, "until"), granularity or None
        )
    except ValueError as exc:
        raise ApiException(422, "invalid_request", str(exc)) from None
    return JSONResponse({"groups": result})


public = APIRouter(prefix="/v1")


@public.get("/health")
async def server_health() -> dict[str, str]:
    """Liveness; needs no token."""
    return {"status": "ok"}
