"""What every `/runpod/v2` route does alike: RunPod's errors, its API key, its endpoint ids, and
the job behind a path; the routes themselves are in `api/runpod.py`.

RunPod's errors are `{"error": "message"}` with the status that fits, never ember's
`{"error": {"code", "message"}}` nor FastAPI's validation body: a route wrapped in
`runpod_errors` answers every refusal so, an unexpected error included (logged as any other).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

from ember.api.auth import Auth, Principal, Scope
from ember.api.bodies import parse_json, plane
from ember.api.errors import ApiException, internal_error
from ember.api.responses import JSONResponse
from ember.api.routes import REFUSALS, refusal
from ember.control.errors import (
    NotFoundError,
)
from ember.control.records import FunctionMeta, Job
from ember.core import runpod as rp

Handler = Callable[..., Awaitable[Response]]


def error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """A refusal as RunPod words one."""
    response = JSONResponse({"error": message}, status_code=status)
    response.headers.update(headers or {})
    return response


def runpod_errors(handler: Handler) -> Handler:
    """Answer the route's refusals (its auth's included) as RunPod does."""

    @functools.wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(*args, **kwargs)
        except HTTPException as exc:
            return error(exc.status_code, str(exc.detail), exc.headers)
        except Exception as exc:
            internal_error()  # logs it, with its traceback
            return error(500, f"internal error ({type(exc).__name__}); see the server log")

    return guarded


def authorize(request: Request, scope: Scope) -> Principal:
    """The caller: RunPod's clients send the API key as `Authorization: Bearer KEY`, and RunPod
    takes a bare `Authorization: KEY` too; an ember token is the key."""
    header = request.headers.get("authorization", "").strip()
    if header and " " not in header:
        header = f"Bearer {header}"
    auth: Auth = request.app.state.auth
    return auth.require(request, scope, header=header)


@dataclass(frozen=True, slots=True)
class Target:
    """The function an endpoint id names, in the caller's workspace."""

    endpoint: str
    app: str
    fn: str
    meta: FunctionMeta


def target(request: Request, who: Principal, endpoint: str) -> Target:
    """The function behind `endpoint` (`APP~FN`, or `APP` alone), or a 404 naming what exists."""
    cp = plane(request)
    app, fn = rp.parse_endpoint(endpoint)
    try:
        state, _ = cp.lookup(who.workspace, app)
        if fn is None:
            fn = rp.resolve(state.functions)
            if fn is None:
                ids = ", ".join(rp.endpoint_id(app, f) for f in state.functions)
                raise ApiException(
                    404,
                    "endpoint_not_found",
                    f"endpoint {endpoint!r}: app {app!r} has several functions and none named "
                    f"{rp.HANDLER!r}: name one, as one of {ids}",
                )
        _, meta = cp.lookup(who.workspace, app, fn)
    except NotFoundError as exc:
        raise ApiException(404, exc.code, f"no endpoint {endpoint!r}: {exc.message}") from None
    assert meta is not None
    return Target(endpoint, app, fn, meta)


async def request_of(request: Request, runsync: bool) -> rp.Request:
    """The body of a `run` or `runsync`, checked; its result kept as the server says."""
    quotas = plane(request).settings.quotas
    retain = quotas.runpod_runsync_retention_s if runsync else quotas.runpod_run_retention_s
    try:
        return rp.parse_request(parse_json(await request.body()), retain)
    except rp.RequestError as exc:
        raise ApiException(400, "invalid_request", str(exc)) from None


def submit(request: Request, who: Principal, to: Target, req: rp.Request) -> Job:
    """A new job of the endpoint's function, or the refusal the native API would answer (in
    RunPod's shape, by `runpod_errors`)."""
    try:
        return plane(request).submit(
            who.workspace,
            to.app,
            to.fn,
            req.input,
            policy=who.policy,
            token=who.token,
            options=req.options,
        )
    except REFUSALS as exc:
        raise refusal(request, who, f"{to.app}/{to.fn}", exc) from None


async def job_of(request: Request, who: Principal, to: Target, job_id: str) -> Job | dict[str, Any]:
    """A job of the endpoint's own function in the caller's workspace (live, or its stored
    body), else a 404: a job is reached only through its own endpoint."""
    missing = ApiException(404, "job_not_found", f"no job {job_id!r} on endpoint {to.endpoint!r}")
    try:
        job = await plane(request).get_job(who.workspace, job_id)
    except NotFoundError:
        raise missing from None
    owner = (job.app, job.function) if isinstance(job, Job) else (job["app"], job["function"])
    if owner != (to.app, to.fn):
        raise missing
    return job


def status_of(job: Job | dict[str, Any]) -> dict[str, Any]:
    """RunPod's status body of a job: its progress as `output` while it runs (when its handler
    reported one), its worker's id (a stored job's is not kept)."""
    if isinstance(job, dict):
        return rp.status_body(job)
    body = job.body()
    progress = getattr(job, "progress", None)
    if progress is not None:
        body = {**body, "progress": progress}
    return rp.status_body(body, job.worker.id if job.worker is not None else None)


class Streams:
    """How many chunks of each job a `stream` read has sent. RunPod's client polls `stream`
    and yields every chunk it gets: each read sends only what the one before did not."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._sent: OrderedDict[str, int] = OrderedDict()

    def take(self, job_id: str, chunks: list[Any]) -> list[Any]:
        sent = self._sent.pop(job_id, 0)
        if sent > len(chunks):  # retried: its run started again from nothing
            sent = 0
        self._sent[job_id] = len(chunks)
        while len(self._sent) > self.size:
            self._sent.popitem(last=False)
        return chunks[sent:]

    def forget(self, job_id: str) -> None:
        self._sent.pop(job_id, None)


def streams(request: Request) -> Streams:
    found: Streams | None = getattr(request.app.state, "runpod_streams", None)
    if found is None:
        found = request.app.state.runpod_streams = Streams()
    return found
