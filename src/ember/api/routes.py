"""The /v1 endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from ember.api import schemas
from ember.api.auth import Principal, need_deploy, need_invoke, need_read
from ember.api.bodies import audit, call_of_body, json_body, openapi_body, plane
from ember.api.errors import ApiException
from ember.api.responses import JSONResponse, encode, encode_ascii
from ember.control.errors import (
    BudgetBlocked,
    IdempotencyConflict,
    InputError,
    NotFoundError,
    PolicyDenied,
    QueueFullError,
    RetryRefused,
    UnplaceableError,
)
from ember.control.manifest import DeployError
from ember.control.plane import ControlPlane
from ember.control.records import Job
from ember.core.idempotency import key_problem
from ember.core.jobs import JobOptions, JobStatus

router = APIRouter(prefix="/v1", responses=schemas.ERRORS)
RUNSYNC_WAIT = 60.0
"""How long /runsync waits for the job before answering 202, unless `wait` says otherwise."""
RUNSYNC_MAX_WAIT = 3600.0


_KEY = Header(
    None,
    alias="Idempotency-Key",
    description="a unique string per request (a UUID): a repeat with the same key and body gets "
    "the same job instead of a second one; the same key with another body is a 409",
)
_BUDGET: dict[int | str, dict[str, Any]] = {
    402: {"model": schemas.ErrorBody, "description": "the token's policy is over budget"},
    429: {
        "model": schemas.ErrorBody,
        "description": "the workspace's queue is full (max_queued_jobs or max_queued_bytes); "
        "retry after the Retry-After header's seconds",
    },
}


class CallResponse(JSONResponse):
    """A call's answer: the bytes and headers of JSONResponse(content, status_code), made with
    one encoder built once (json.dumps with options builds one per call) and the headers written
    out, as JSONResponse would write them for these arguments."""

    def __init__(self, content: Any, status_code: int = 200) -> None:
        self.status_code = status_code
        self.background = None
        self.body = encode(content)
        self.raw_headers = [
            (b"content-length", str(len(self.body)).encode("latin-1")),
            (b"content-type", b"application/json"),
        ]


def _not_found(exc: NotFoundError) -> ApiException:
    return ApiException(404, exc.code, exc.message)


async def _submit(
    request: Request,
    who: Principal,
    app: str,
    fn: str,
    input: Any,
    options: JobOptions | None = None,
) -> Job | dict[str, Any]:
    """The call's job: a new one, or under an Idempotency-Key the one the key names (a body,
    when it is stored only)."""
    key = request.headers.get("idempotency-key")
    if key is not None and (problem := key_problem(key)) is not None:
        raise ApiException(400, "invalid_idempotency_key", problem)
    cp = plane(request)
    try:
        try:
            return await _job_of_call(cp, who, app, fn, input, key, options)
        except NotFoundError:
            if not await cp.cluster.read_again():  # a standby: deployed elsewhere just now?
                raise
            return await _job_of_call(cp, who, app, fn, input, key, options)
    except REFUSALS as exc:
        raise refusal(request, who, f"{app}/{fn}", exc) from None


REFUSALS = (
    IdempotencyConflict,
    BudgetBlocked,
    PolicyDenied,
    NotFoundError,
    InputError,
    UnplaceableError,
    QueueFullError,
    RecursionError,
)
"""What a call can be refused with before its job exists."""


def refusal(request: Request, who: Principal, where: str, exc: Exception) -> ApiException:
    """The answer to a call refused before its job exists (`where`: APP/FN), for every API
    that submits jobs; a budget's or a policy's refusal is audited."""
    if isinstance(exc, IdempotencyConflict):
        return ApiException(409, "idempotency_conflict", str(exc))
    if isinstance(exc, BudgetBlocked):
        b = exc.blocked
        audit(request, who, "budget.block", "refused", where, {"policy": who.policy})
        extra = {"budget_usd": b.budget_usd, "spent_usd": round(b.spent_usd, 6)}
        return ApiException(402, "budget_exceeded", b.message, {**extra, "reset_at": b.reset_at})
    if isinstance(exc, PolicyDenied):
        audit(request, who, "policy.deny", "refused", where, {"policy": who.policy})
        return ApiException(403, "policy_denied", str(exc))
    if isinstance(exc, NotFoundError):
        return _not_found(exc)
    if isinstance(exc, InputError):
        return ApiException(422, "invalid_input", str(exc))
    if isinstance(exc, UnplaceableError):
        return ApiException(422, "no_fitting_gpu", str(exc))
    if isinstance(exc, QueueFullError):
        return _queue_full(exc)
    return ApiException(422, "invalid_input", "input is nested too deeply")  # RecursionError


async def _job_of_call(
    cp: ControlPlane,
    who: Principal,
    app: str,
    fn: str,
    input: Any,
    key: str | None,
    options: JobOptions | None,
) -> Job | dict[str, Any]:
    if key is None:
        return cp.submit(
            who.workspace, app, fn, input, policy=who.policy, token=who.token, options=options
        )
    return await cp.submit_once(
        who.workspace, app, fn, input, key, policy=who.policy, token=who.token, options=options
    )


def _queue_full(exc: QueueFullError) -> ApiException:
    """429 with Retry-After while the workspace's queue is full; 413 for an input that alone is
    larger than the bytes limit (waiting will not help)."""
    full = exc.full
    if full.never:
        return ApiException(413, "payload_too_large", full.message, full.to_dict())
    refused = ApiException(429, "queue_full", full.message, full.to_dict())
    refused.headers = {"Retry-After": str(full.retry_after_s)}
    return refused


async def queue_job(request: Request, who: Principal, app: str, fn: str) -> Response:
    """POST .../run, once the caller is known (also served by `ember.api.invoke`)."""
    job = await _submit(request, who, app, fn, *call_of_body(await request.body()))
    if isinstance(job, dict):  # a repeat of a job stored before
        return CallResponse({"id": job["id"], "status": job["status"]}, status_code=202)
    await plane(request).stored(job)
    status = "IN_QUEUE" if job.idempotency_key is None else job.status.value  # perhaps a repeat
    return CallResponse({"id": job.id, "status": status}, status_code=202)


async def run_job(request: Request, who: Principal, app: str, fn: str, wait: float) -> Response:
    """POST .../runsync, once the caller is known (also served by `ember.api.invoke`)."""
    job = await _submit(request, who, app, fn, *call_of_body(await request.body()))
    if isinstance(job, dict):  # a repeat of a job stored before: as it is now
        return CallResponse(job, 200 if JobStatus(job["status"]).terminal else 202)
    try:
        async with asyncio.timeout(wait):  # no task per call, unlike asyncio.wait_for
            await job.done.wait()
    except TimeoutError:
        await plane(request).stored(job)  # its id leaves in the 202: from now on it is durable
        return CallResponse(job.body(), status_code=202)
    return CallResponse(job.body())


@router.post(
    "/apps/{app}/{fn}/run",
    status_code=202,
    response_model=schemas.Accepted,
    responses=_BUDGET,
    openapi_extra=openapi_body(schemas.RunRequest),
)
async def run(
    request: Request,
    app: str,
    fn: str,
    idempotency_key: str | None = _KEY,
    who: Principal = Depends(need_invoke),
) -> Response:
    """Queue a job; it is durable before this answers."""
    return await queue_job(request, who, app, fn)


@router.post(
    "/apps/{app}/{fn}/runsync",
    response_model=schemas.JobBody,
    responses={
        **_BUDGET,
        202: {"model": schemas.JobBody, "description": "the job, still running after `wait` s"},
    },
    openapi_extra=openapi_body(schemas.RunRequest),
)
async def runsync(
    request: Request,
    app: str,
    fn: str,
    wait: float = Query(
        RUNSYNC_WAIT, ge=0, le=RUNSYNC_MAX_WAIT, description="seconds to wait before answering 202"
    ),
    idempotency_key: str | None = _KEY,
    who: Principal = Depends(need_invoke),
) -> Response:
    """Run a job and answer with its body once it ends, or 202 after `wait` seconds."""
    return await run_job(request, who, app, fn, wait)


async def _job(request: Request, who: Principal, job_id: str) -> Job | dict[str, Any]:
    try:
        return await plane(request).get_job(who.workspace, job_id)
    except NotFoundError as exc:
        raise _not_found(exc) from None


@router.get("/jobs/{job_id}", response_model=schemas.JobBody)
async def get_job(
    request: Request,
    job_id: str,
    wait: float = Query(0.0, ge=0, le=300, description="wait up to this long for the job to end"),
    who: Principal = Depends(need_read),
) -> Response:
    job = await _job(request, who, job_id)
    if isinstance(job, dict):
        return JSONResponse(job)
    if wait > 0 and not job.status.terminal:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.done.wait(), wait)
    return JSONResponse(job.body())


@router.post("/jobs/{job_id}/cancel", response_model=schemas.JobBody)
async def cancel_job(
    request: Request, job_id: str, who: Principal = Depends(need_invoke)
) -> Response:
    """Cancel a queued or running job; running code is interrupted, or its worker stopped."""
    job = await _job(request, who, job_id)
    if isinstance(job, dict):
        audit(request, who, "job.cancel", "already_ended", job_id)
        return JSONResponse(job)
    was = job.status.value
    plane(request).cancel(job)
    audit(request, who, "job.cancel", "ok", job_id, {"was": was})
    return JSONResponse(job.body())


@router.post(
    "/jobs/{job_id}/retry",
    response_model=schemas.JobBody,
    responses={409: {"model": schemas.ErrorBody, "description": "queued, running or completed"}},
)
async def retry_job(
    request: Request, job_id: str, who: Principal = Depends(need_invoke)
) -> Response:
    """Queue a job that ended FAILED, TIMED_OUT or CANCELLED again, under the same id."""
    try:
        job = await plane(request).retry(who.workspace, job_id)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    except RetryRefused as exc:
        audit(request, who, "job.retry", "refused", job_id)
        raise ApiException(409, "not_retryable", str(exc)) from None
    audit(request, who, "job.retry", "ok", job_id)
    return JSONResponse(job.body())


@router.post("/apps/{app}/{fn}/purge-queue", response_model=schemas.Purged)
async def purge_queue(
    request: Request, app: str, fn: str, who: Principal = Depends(need_invoke)
) -> Response:
    """Cancel every queued job of the function; running ones run on."""
    try:
        removed = plane(request).purge(who.workspace, app, fn)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    audit(request, who, "queue.purge", "ok", f"{app}/{fn}", {"removed": removed})
    return JSONResponse({"removed": removed})


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + encode_ascii(data) + b"\n\n"


@router.get(
    "/jobs/{job_id}/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_job(
    request: Request, job_id: str, who: Principal = Depends(need_read)
) -> StreamingResponse:
    """Server-sent events: one `output` per yielded value, then `done` with the job body."""
    job = await _job(request, who, job_id)

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
    openapi_extra=openapi_body(schemas.DeployRequest),
)
async def deploy(request: Request, who: Principal = Depends(need_deploy)) -> Response:
    """Deploy (or redeploy) an app: a new immutable version; old workers drain."""
    body = await json_body(request)
    name = body.get("name") if isinstance(body, dict) else None
    target = name if isinstance(name, str) else None
    try:
        result = await plane(request).deploy(who.workspace, body)
    except DeployError as exc:
        audit(request, who, "app.deploy", "invalid", target, {"error": str(exc)[:300]})
        raise ApiException(422, "invalid_deploy", str(exc)) from None
    audit(request, who, "app.deploy", "ok", target, {"version": result["version"]})
    return JSONResponse(result, status_code=201)


@router.get("/apps", response_model=schemas.AppList)
async def list_apps(request: Request, who: Principal = Depends(need_read)) -> Response:
    apps = [a.describe() for a in plane(request).apps_of(who.workspace)]
    return JSONResponse({"apps": apps})


@router.get("/apps/{app}", response_model=schemas.AppInfo)
async def get_app(request: Request, app: str, who: Principal = Depends(need_read)) -> Response:
    try:
        state, _ = plane(request).lookup(who.workspace, app)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    return JSONResponse(state.describe())


@router.get("/apps/{app}/{fn}/health", response_model=schemas.Health)
async def health(
    request: Request, app: str, fn: str, who: Principal = Depends(need_read)
) -> Response:
    try:
        return JSONResponse(plane(request).health(who.workspace, app, fn))
    except NotFoundError as exc:
        raise _not_found(exc) from None


@router.get("/apps/{app}/{fn}/logs", response_model=schemas.LogLines)
async def logs(
    request: Request,
    app: str,
    fn: str,
    tail: int = Query(100, ge=0, le=100_000),
    since: float = Query(0.0, ge=0),
    job: str | None = Query(None, description="only this job's lines"),
    who: Principal = Depends(need_read),
) -> Response:
    """Worker output of a function, each line with its job id; `fn` may name a class, for
    every line of its workers (its methods' calls and its hooks' prints)."""
    cp = plane(request)
    try:
        state, _ = cp.lookup(who.workspace, app)
        if not any(m.unit == fn for m in state.functions.values()):
            cp.lookup(who.workspace, app, fn)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    key = f"{who.workspace}/{app}"
    lines = await asyncio.to_thread(cp.logs.read, key, fn, tail=tail, since=since, job=job)
    return JSONResponse({"lines": lines})


@router.get("/workers", response_model=schemas.WorkerList)
async def workers(request: Request, who: Principal = Depends(need_read)) -> Response:
    """The workspace's live workers."""
    live = plane(request).workers_of(who.workspace)
    return JSONResponse({"workers": [w.describe() for w in live]})


@router.get("/nodes", response_model=schemas.NodeList)
async def nodes(request: Request, who: Principal = Depends(need_read)) -> Response:
    """GPUs of each node (simulated ones are labelled), and this workspace's workers on each."""
    return JSONResponse({"nodes": plane(request).nodes(who.workspace)})


def _time(value: str | None, name: str) -> float | None:
    """Epoch seconds, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise ApiException(422, "invalid_request", f"{name}={value!r} is not a finite time")
        return number
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ApiException(
            422,
            "invalid_request",
            f"{name}={value!r} is neither epoch seconds nor ISO 8601: use e.g. 1717200000 or "
            "2024-06-01T12:00:00Z (the CLI also takes 30s, 15m, 2h, 7d ago)",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@router.get("/usage", response_model=schemas.UsageGroups)
async def usage(
    request: Request,
    group_by: str = Query(
        "app", description="comma-separated: app, function, gpu, phase, policy, tag:NAME"
    ),
    since: str | None = Query(None, description="epoch seconds or ISO 8601"),
    until: str | None = Query(None, description="epoch seconds or ISO 8601"),
    granularity: str | None = Query(None, description="hour or day: one group per bucket"),
    who: Principal = Depends(need_read),
) -> Response:
    """Metered usage and cost per group; `idle_fraction` is the share of GPU money spent waiting."""
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    try:
        result = await plane(request).usage(
            who.workspace, groups, _time(since, "since"), _time(until, "until"), granularity or None
        )
    except ValueError as exc:
        raise ApiException(422, "invalid_request", str(exc)) from None
    return JSONResponse({"groups": result})


public = APIRouter(prefix="/v1")


@public.get("/health")
async def server_health(request: Request) -> dict[str, str]:
    """Liveness, and whether this server schedules or stands by (several servers); no token."""
    return {"status": "ok", "role": "leader" if plane(request).cluster.leading else "standby"}
