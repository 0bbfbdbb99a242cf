"""The read endpoints a dashboard browses with: who the token is, a function's last hour, the
jobs of a workspace page by page, and a job's input.

Each answers for the token's workspace only, as the rest of /v1 does; on a standby they go to
the scheduler (`api/forward.py`), which holds the series and the jobs in flight.
"""

from __future__ import annotations

import base64
import binascii
import math

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ember.api import schemas
from ember.api.auth import Principal, need_read
from ember.api.bodies import plane
from ember.api.errors import ApiException
from ember.api.responses import JSONResponse
from ember.control.errors import NotFoundError
from ember.control.job_rows import Listing
from ember.core.jobs import JobStatus
from ember.core.series import BadQuery

router = APIRouter(prefix="/v1", responses=schemas.ERRORS)

MAX_LIMIT = 500
ALIASES = {"QUEUED": JobStatus.IN_QUEUE.value, "RUNNING": JobStatus.IN_PROGRESS.value}
"""What people call the two states a job is in before it ends."""


def _bad(message: str) -> ApiException:
    return ApiException(422, "invalid_request", message)


@router.get("/whoami", response_model=schemas.Whoami)
async def whoami(who: Principal = Depends(need_read)) -> Response:
    """The token's workspace, scope and name: what a client may show and offer."""
    return JSONResponse({"workspace": who.workspace, "scope": who.scope.label, "token": who.token})


@router.get("/series", response_model=schemas.SeriesView)
async def series(
    request: Request,
    app: str | None = Query(None, description="one app's calls (default: the workspace's)"),
    function: str | None = Query(None, description="one function of `app` (a class: its methods)"),
    window: int = Query(3600, ge=60, le=3600, description="seconds back from now"),
    step: int = Query(
        10, ge=10, le=1800, multiple_of=10, description="seconds per point, up to window/2"
    ),
    who: Principal = Depends(need_read),
) -> Response:
    """Calls, failures, cold starts, latency percentiles and workers by state over the last
    hour (at most), one point per step: kept in memory by the scheduling server."""
    try:
        view = plane(request).series_view(
            who.workspace, app or None, function or None, window, step
        )
    except BadQuery as exc:
        raise _bad(str(exc)) from None
    return JSONResponse(view)


def statuses_of(value: str | None) -> frozenset[str] | None:
    if value is None or not value.strip():
        return None
    known = {s.value for s in JobStatus}
    found = set()
    for part in value.split(","):
        name = part.strip().upper()
        name = ALIASES.get(name, name)
        if name not in known:
            allowed = ", ".join([*sorted(known), *ALIASES])
            raise _bad(f"status={part.strip()!r} is not a job status: use one or more of {allowed}")
        found.add(name)
    return frozenset(found)


def cursor_of(created_at: float, job_id: str) -> str:
    raw = f"{created_at!r}~{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def after_of(cursor: str | None) -> tuple[float, str] | None:
    """The (created_at, id) a cursor holds; 422 for one this server did not give."""
    if cursor is None or cursor == "":
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, sep, job_id = raw.partition("~")
        moment = float(at)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        moment, sep, job_id = math.nan, "", ""
    if not sep or not job_id or not math.isfinite(moment):
        raise _bad(
            f"cursor={cursor[:60]!r} is not one this server gave: pass a page's next_cursor as "
            "it came, or leave cursor out for the first page"
        )
    return moment, job_id


@router.get("/jobs", response_model=schemas.JobList)
async def list_jobs(
    request: Request,
    app: str | None = Query(None),
    function: str | None = Query(None, description="a function's name, as its jobs carry it"),
    status: str | None = Query(
        None,
        description="comma-separated: IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, "
        "CANCELLED, TIMED_OUT (QUEUED and RUNNING too)",
    ),
    since: float | None = Query(None, description="epoch seconds: jobs created since"),
    id: str | None = Query(None, description="the start of a job id"),
    limit: int = Query(50, ge=1, le=MAX_LIMIT, description="jobs per page"),
    cursor: str | None = Query(None, description="the next_cursor of the page before"),
    who: Principal = Depends(need_read),
) -> Response:
    """The workspace's jobs, newest first, a page at a time (those still kept: see
    --job-retention)."""
    if since is not None and not math.isfinite(since):
        raise _bad(f"since={since} is not a finite time: give epoch seconds")
    which = Listing(
        who.workspace,
        app=app or None,
        function=function or None,
        statuses=statuses_of(status),
        since=since,
        id_prefix=id or None,
        after=after_of(cursor),
    )
    jobs, last = await plane(request).list_jobs(which, limit)
    next_cursor = None if last is None else cursor_of(*last)
    return JSONResponse({"jobs": jobs, "next_cursor": next_cursor})


@router.get(
    "/jobs/{job_id}/input",
    response_model=schemas.JobInput,
)
async def job_input(request: Request, job_id: str, who: Principal = Depends(need_read)) -> Response:
    """The job's input as it was submitted (JSON text), cut at 64 KiB."""
    try:
        return JSONResponse(await plane(request).job_input(who.workspace, job_id))
    except NotFoundError as exc:
        raise ApiException(404, exc.code, exc.message) from None
