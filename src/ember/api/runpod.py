"""RunPod Serverless's client API, under `/runpod/v2/{endpoint_id}/...`.

A RunPod client works unchanged against ember: `runpod.endpoint_url_base` set to
`http://HOST:PORT/runpod/v2`, an ember token as `runpod.api_key`, and an endpoint id naming a
function (`APP~FN`, or `APP` alone: `ember endpoints` lists them). Requests and answers are
RunPod's, field for field (`ember.core.runpod` shapes them); so are the errors
(`{"error": "message"}`, see `api/runpod_calls.py`). The routes are RunPod's API, documented by
RunPod and docs/api.md, and kept out of ember's OpenAPI document.

On a standby server (several servers on one store) every one of these paths is forwarded to the
scheduler, as it came (`api/forward.py`): none is one a standby answers itself.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import Match

from ember.api.auth import Scope
from ember.api.bodies import audit, plane
from ember.api.errors import ApiException
from ember.api.responses import JSONResponse
from ember.api.runpod_calls import (
    authorize,
    error,
    job_of,
    request_of,
    runpod_errors,
    status_of,
    streams,
    submit,
    target,
)
from ember.control.errors import NotFoundError, RetryRefused
from ember.control.records import Job
from ember.core import runpod as rp

router = APIRouter(prefix="/runpod/v2", include_in_schema=False)

STREAM_WAIT_S = 3.0
"""How long a `stream` read with nothing new waits for a chunk or the job's end. RunPod's
client sleeps a second between reads and gives each 10 s."""
STATUS_MAX_WAIT_MS = 300_000
GENERATORS = ("generator", "async_generator")


@router.post("/{endpoint}/run")
@runpod_errors
async def run(request: Request, endpoint: str) -> Response:
    """Queue a job: `{"id", "status"}` once it is durable."""
    who = authorize(request, Scope.INVOKE)
    to = target(request, who, endpoint)
    job = submit(request, who, to, await request_of(request, runsync=False))
    await plane(request).stored(job)
    return JSONResponse({"id": job.id, "status": job.status.value})


@router.post("/{endpoint}/runsync")
@runpod_errors
async def runsync(request: Request, endpoint: str) -> Response:
    """Run a job and answer its status body once it ends, or `{"id", "status"}` after `wait`
    milliseconds (90000 unless asked, at most 300000)."""
    who = authorize(request, Scope.INVOKE)
    wait = _wait(request, rp.RUNSYNC_WAIT_MS, rp.RUNSYNC_MAX_WAIT_MS)
    to = target(request, who, endpoint)
    job = submit(request, who, to, await request_of(request, runsync=True))
    try:
        async with asyncio.timeout(wait):
            await job.done.wait()
    except TimeoutError:
        await plane(request).stored(job)  # its id leaves now: from here on it is durable
        return JSONResponse({"id": job.id, "status": job.status.value})
    return JSONResponse(status_of(job))


def _wait(request: Request, default_ms: int, max_ms: int) -> float:
    try:
        return rp.parse_wait(request.query_params.get("wait"), default_ms, max_ms)
    except rp.RequestError as exc:
        raise ApiException(400, "invalid_request", str(exc)) from None


@router.api_route("/{endpoint}/status/{job_id}", methods=["GET", "POST"])
@runpod_errors
async def status(request: Request, endpoint: str, job_id: str) -> Response:
    """A job's status body; `?wait=MS` waits that long for a running job to end."""
    who = authorize(request, Scope.READ)
    wait = _wait(request, 0, STATUS_MAX_WAIT_MS)
    job = await job_of(request, who, target(request, who, endpoint), job_id)
    if isinstance(job, Job) and wait > 0 and not job.status.terminal:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await job.done.wait()
    return JSONResponse(status_of(job))


@router.api_route("/{endpoint}/stream/{job_id}", methods=["GET", "POST"])
@runpod_errors
async def stream(request: Request, endpoint: str, job_id: str) -> Response:
    """`{"status", "stream": [{"output": chunk}, ...]}`: the chunks since the last read of this
    job (a generator's values; another function's output, once, at its end). With nothing new
    from a running job, it waits a few seconds for some."""
    who = authorize(request, Scope.READ)
    to = target(request, who, endpoint)
    job = await job_of(request, who, to, job_id)
    cursors = streams(request)
    key = f"{who.workspace}/{job_id}"
    if isinstance(job, dict):  # ended and stored
        generator = to.meta.kind in GENERATORS
        done = rp.chunks(job["status"], job["output"], None, generator)
        return JSONResponse(rp.stream_body(job, cursors.take(key, done)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STREAM_WAIT_S
    while True:
        changed = job.changed  # taken before reading: a change from here on wakes us
        body = job.body()
        chunks = rp.chunks(body["status"], body["output"], job.outputs, job.is_generator)
        new = cursors.take(key, chunks)
        left = deadline - loop.time()
        if new or job.status.terminal or left <= 0:
            return JSONResponse(rp.stream_body(body, new))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                await changed.wait()


@router.post("/{endpoint}/cancel/{job_id}")
@runpod_errors
async def cancel(request: Request, endpoint: str, job_id: str) -> Response:
    """Cancel a queued or running job: its status body (CANCELLED, or how it ended before)."""
    who = authorize(request, Scope.INVOKE)
    job = await job_of(request, who, target(request, who, endpoint), job_id)
    if isinstance(job, dict):
        audit(request, who, "job.cancel", "already_ended", job_id, {"via": "runpod"})
        return JSONResponse(status_of(job))
    was = job.status.value
    plane(request).cancel(job)
    audit(request, who, "job.cancel", "ok", job_id, {"was": was, "via": "runpod"})
    return JSONResponse(status_of(job))


@router.post("/{endpoint}/retry/{job_id}")
@runpod_errors
async def retry(request: Request, endpoint: str, job_id: str) -> Response:
    """Run a failed (or timed-out, or cancelled) job again under its id: `{"id", "status"}`."""
    who = authorize(request, Scope.INVOKE)
    to = target(request, who, endpoint)
    await job_of(request, who, to, job_id)
    try:
        job = await plane(request).retry(who.workspace, job_id)
    except RetryRefused as exc:
        audit(request, who, "job.retry", "refused", job_id, {"why": str(exc)[:300]})
        raise ApiException(409, "retry_refused", str(exc)) from None
    except NotFoundError:
        raise ApiException(
            404, "job_not_found", f"no job {job_id!r} on endpoint {endpoint!r}"
        ) from None
    streams(request).forget(f"{who.workspace}/{job_id}")
    audit(request, who, "job.retry", "ok", job_id, {"via": "runpod"})
    return JSONResponse({"id": job.id, "status": job.status.value})


@router.post("/{endpoint}/purge-queue")
@runpod_errors
async def purge_queue(request: Request, endpoint: str) -> Response:
    """Cancel every queued job of the endpoint (running ones run on): `{"removed", "status"}`."""
    who = authorize(request, Scope.INVOKE)
    to = target(request, who, endpoint)
    removed = plane(request).purge(who.workspace, to.app, to.fn)
    audit(request, who, "queue.purge", "ok", f"{to.app}/{to.fn}", {"removed": removed})
    return JSONResponse({"removed": removed, "status": "completed"})


@router.get("/{endpoint}/health")
@runpod_errors
async def health(request: Request, endpoint: str) -> Response:
    """`{"jobs": {"completed", "failed", "inProgress", "inQueue", "retried"}, "workers":
    {"idle", "running", "initializing"}}`."""
    who = authorize(request, Scope.READ)
    to = target(request, who, endpoint)
    return JSONResponse(rp.health_body(plane(request).health(who.workspace, to.app, to.fn)))


_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@router.api_route("/{rest:path}", methods=_METHODS)
async def unknown(request: Request, rest: str) -> Response:
    """Any other path or method under /runpod/v2: RunPod's 404 or 405, not ember's."""
    allowed: set[str] = set()
    for route in router.routes:
        if not isinstance(route, APIRoute) or route.endpoint is unknown:
            continue
        if route.matches(request.scope)[0] != Match.NONE:
            allowed |= route.methods or set()
    if allowed:
        message = f"{request.method} is not allowed here: use {', '.join(sorted(allowed))}"
        return error(405, message, {"Allow": ", ".join(sorted(allowed))})
    return error(
        404,
        f"no such route: /runpod/v2/{rest[:200]} (routes: ENDPOINT/run, runsync, status/ID, "
        "stream/ID, cancel/ID, retry/ID, purge-queue, health)",
    )
