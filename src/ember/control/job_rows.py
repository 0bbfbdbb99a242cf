"""Jobs as rows of the store: the statements the job room writes and the reads it makes.

The job room (`control/jobs.py`) keeps jobs in memory and decides; this module only turns a job
into a row and a row into a job's body, and holds the statements built once (building one per
job cost the event loop more than writing it). Reads run in a thread, never on the loop.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from ember.control.records import Job
from ember.core.jobs import JobOptions, JobStatus
from ember.core.quotas import PRUNE_BATCH
from ember.store import tables

FINISH_JOB = (
    update(tables.jobs)
    .where(tables.jobs.c.id == bindparam("job_id"))
    .values(
        {
            c: bindparam(c)
            for c in (
                *("status", "output", "error", "timings", "cost"),
                *("attempts", "version", "finished_at"),
            )
        }
    )
)
FINISH_OWNED = FINISH_JOB.where(tables.jobs.c.owner == bindparam("owned_by"))
"""FINISH_JOB for a scheduler among several: only while the job is still its own (its epoch)."""
INSERT_JOB = insert(tables.jobs)

_ENDED = [s.value for s in JobStatus if s.terminal]


def insert_unless_keyed(engine: Engine) -> Any:
    """An INSERT of a job's row that does nothing when a row holds its Idempotency-Key."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    # RETURNING says whether it inserted: psycopg's rowcount for it is -1 either way.
    return dialect.insert(tables.jobs).on_conflict_do_nothing().returning(tables.jobs.c.id)


@dataclass(slots=True)
class InsertOnce:
    """A writer Op running `insert_unless_keyed` for one row; says whether it inserted."""

    stmt: Any
    row: dict[str, Any]
    inserted: bool = False

    def __call__(self, conn: Connection) -> None:
        self.inserted = conn.execute(self.stmt, self.row).first() is not None


def row(job: Job, owner: int | None = None) -> dict[str, Any]:
    """A job's row as accepted: queued, no attempt yet, taken by the scheduler of epoch `owner`
    (None: by the one server, or by no scheduler yet when a standby accepted it)."""
    found = {
        "owner": owner,
        "id": job.id,
        "app": job.app,
        "function": job.function,
        "status": JobStatus.IN_QUEUE.value,
        "input": job.input_json,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "workspace": job.workspace,
        "policy": job.policy,
        "token": job.token,
        "tags": json.dumps(job.tags) if job.tags else None,
        "idempotency_key": job.idempotency_key,
        "request_digest": job.request_digest,
    }
    if (o := job.options) is not None:  # a plain job's row leaves them out: NULL, not bound
        found["webhook"], found["ttl_s"], found["timeout_s"] = o.webhook, o.ttl_s, o.timeout_s
        found["retain_s"], found["via"] = o.retain_s, None if o.via == "v1" else o.via
    return found


def options_of(row: Any) -> JobOptions | None:
    """The options a stored job was submitted with (None: a plain job)."""
    named = (row["webhook"], row["ttl_s"], row["timeout_s"], row["retain_s"], row["via"])
    if all(v is None for v in named):
        return None
    return JobOptions(*named[:4], via=row["via"] or "v1")


def past_retention(finished_at: float | None, retain_s: float | None, now: float) -> bool:
    """Whether an ended job with its own retention is gone (read as never there), though the
    prune may not have deleted it yet; a job without one lives by the server's."""
    return retain_s is not None and finished_at is not None and finished_at + retain_s < now


def body_of(row: Any) -> dict[str, Any]:
    """A stored job's body, as `Job.body` gives a live one's (with its workspace)."""
    return {
        "id": row["id"],
        "app": row["app"],
        "function": row["function"],
        "status": row["status"],
        "output": json.loads(row["output"]) if row["output"] is not None else None,
        "error": json.loads(row["error"]) if row["error"] else None,
        "timings": json.loads(row["timings"]) if row["timings"] else None,
        "cost": json.loads(row["cost"]) if row["cost"] else None,
        "tags": json.loads(row["tags"]) if row["tags"] else {},
        "workspace": row["workspace"],
        "reason": None,
        "attempts": row["attempts"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
    }


def load_job(engine: Engine, job_id: str) -> dict[str, Any] | None:
    """A stored job's body (with its workspace), or None."""
    with engine.connect() as conn:
        found = (
            conn.execute(select(tables.jobs).where(tables.jobs.c.id == job_id)).mappings().first()
        )
    if found is None or past_retention(found["finished_at"], found["retain_s"], time.time()):
        return None
    return body_of(found)


def load_row(engine: Engine, job_id: str) -> dict[str, Any] | None:
    """A stored job's whole row (its input too), or None."""
    with engine.connect() as conn:
        found = (
            conn.execute(select(tables.jobs).where(tables.jobs.c.id == job_id)).mappings().first()
        )
    return None if found is None else dict(found)


REOPEN_JOB = (
    update(tables.jobs)
    .where(tables.jobs.c.id == bindparam("job_id"))
    .values(
        status=JobStatus.IN_QUEUE.value,
        output=None,
        error=None,
        timings=None,
        cost=None,
        version=None,
        finished_at=None,
        attempts=0,
        created_at=bindparam("created_at"),
        owner=bindparam("owned_by"),
    )
)
"""An ended job queued again under its id (a retry): as accepted anew, its options kept."""


def load_keyed(engine: Engine, workspace: str, key: str) -> dict[str, Any] | None:
    """The stored body of the workspace's job under Idempotency-Key `key`, with the
    `request_digest` it was submitted with, or None."""
    j = tables.jobs.c
    with engine.connect() as conn:
        found = (
            conn.execute(
                select(tables.jobs).where(j.workspace == workspace, j.idempotency_key == key)
            )
            .mappings()
            .first()
        )
    if found is None:
        return None
    body = body_of(found)
    del body["workspace"]
    return {**body, "request_digest": found["request_digest"]}


_UNFINISHED = [JobStatus.IN_QUEUE.value, JobStatus.IN_PROGRESS.value]


def take(conn: Connection, epoch: int, *, all_unfinished: bool) -> list[Any]:
    """Mark jobs as the scheduler of `epoch`'s and return their rows, oldest first: every job
    not ended (`all_unfinished`, when it takes the lease over), else the queued ones that no
    scheduler took or an earlier one did (accepted by a standby, or written late by a scheduler
    that lost its lease)."""
    j = tables.jobs.c
    which: Any
    if all_unfinished:
        which = j.status.in_(_UNFINISHED)
    else:
        which = (j.status == JobStatus.IN_QUEUE.value) & (j.owner.is_(None) | (j.owner < epoch))
    rows = conn.execute(
        update(tables.jobs).where(which).values(owner=epoch).returning(*tables.jobs.c)
    ).mappings()
    return sorted(rows, key=lambda r: r["created_at"])


def take_queued(engine: Engine, epoch: int) -> list[Any]:
    """`take` the queued jobs no scheduler took (blocking)."""
    with engine.begin() as conn:
        return take(conn, epoch, all_unfinished=False)


def ended(engine: Engine, ids: list[str]) -> list[dict[str, Any]]:
    """The stored bodies of those of `ids` that have ended."""
    j = tables.jobs.c
    with engine.connect() as conn:
        found = conn.execute(
            select(tables.jobs).where(j.id.in_(ids), j.status.in_(_ENDED))
        ).mappings()
        return [body_of(r) for r in found]


def queued_elsewhere(engine: Engine) -> dict[str, tuple[int, int]]:
    """Per workspace, the jobs queued in the store and their inputs' bytes (PostgreSQL)."""
    j = tables.jobs.c
    with engine.connect() as conn:
        found = conn.execute(
            select(j.workspace, func.count(), func.sum(func.octet_length(j.input)))
            .where(j.status == JobStatus.IN_QUEUE.value)
            .group_by(j.workspace)
        ).all()
    return {ws: (int(n), int(size or 0)) for ws, n, size in found}


def prune_batch(conn: Connection, cutoff: float, now: float | None = None) -> int:
    """Delete up to PRUNE_BATCH ended jobs that finished before `cutoff`, or, those with a
    retention of their own (`retain_s`), that long before `now` (the writer's thread)."""
    j = tables.jobs.c
    now = time.time() if now is None else now
    past = or_(
        j.retain_s.is_(None) & (j.finished_at < cutoff),
        j.retain_s.is_not(None) & (j.finished_at + j.retain_s < now),
    )
    ids = (
        select(j.id)
        .where(j.finished_at.is_not(None), past, j.status.in_(_ENDED))
        .limit(PRUNE_BATCH)
    )
    result = conn.execute(delete(tables.jobs).where(j.id.in_(ids.scalar_subquery())))
    return int(result.rowcount or 0)


@dataclass(frozen=True, slots=True)
class Listing:
    """Which of a workspace's jobs a listing wants, newest first (created_at, then id)."""

    workspace: str
    app: str | None = None
    function: str | None = None
    statuses: frozenset[str] | None = None
    since: float | None = None
    id_prefix: str | None = None
    after: tuple[float, str] | None = None
    """The (created_at, id) of the last job of the page before: only older ones."""

    def admits(self, job: Job) -> bool:
        """Whether a job in memory is one of the listing's (as `listing` reads the store)."""
        if job.workspace != self.workspace:
            return False
        if self.app is not None and job.app != self.app:
            return False
        if self.function is not None and job.function != self.function:
            return False
        if self.statuses is not None and job.status.value not in self.statuses:
            return False
        if self.since is not None and job.created_at < self.since:
            return False
        if self.id_prefix is not None and not job.id.startswith(self.id_prefix):
            return False
        if self.after is not None and (job.created_at, job.id) >= self.after:
            return False
        o = job.options
        return o is None or not past_retention(job.finished_at, o.retain_s, time.time())


_SUMMARY = [
    tables.jobs.c[name]
    for name in (
        *("id", "app", "function", "status", "created_at", "finished_at", "attempts"),
        *("timings", "cost", "error", "tags"),
    )
]


def _like(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def listing(engine: Engine, which: Listing, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` stored jobs of the listing, newest first, as summaries (blocking)."""
    j = tables.jobs.c
    now = time.time()
    stmt = select(*_SUMMARY).where(
        j.workspace == which.workspace,
        or_(j.retain_s.is_(None), j.finished_at.is_(None), j.finished_at + j.retain_s >= now),
    )
    if which.app is not None:
        stmt = stmt.where(j.app == which.app)
    if which.function is not None:
        stmt = stmt.where(j.function == which.function)
    if which.statuses is not None:
        stmt = stmt.where(j.status.in_(sorted(which.statuses)))
    if which.since is not None:
        stmt = stmt.where(j.created_at >= which.since)
    if which.id_prefix:
        stmt = stmt.where(j.id.like(_like(which.id_prefix), escape="\\"))
    if which.after is not None:
        at, last = which.after
        stmt = stmt.where(or_(j.created_at < at, (j.created_at == at) & (j.id < last)))
    stmt = stmt.order_by(j.created_at.desc(), j.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [summary(r) for r in conn.execute(stmt).mappings()]


def summary(found: Any) -> dict[str, Any]:
    """A job's line in a listing, from its row (JSON text columns) or its body (decoded)."""

    def decoded(name: str) -> Any:
        value = found[name]
        return json.loads(value) if isinstance(value, str) and value else value or None

    timings, cost, error, tags = (decoded(n) for n in ("timings", "cost", "error", "tags"))
    return {
        "id": found["id"],
        "app": found["app"],
        "function": found["function"],
        "status": found["status"],
        "created_at": found["created_at"],
        "finished_at": found["finished_at"],
        "attempts": found["attempts"],
        "total_ms": timings.get("total_ms") if timings else None,
        "cost_usd": cost.get("usd") if cost else None,
        "error_type": error.get("type") if error else None,
        "tags": tags or {},
    }


INPUT_VIEW_BYTES = 65536
"""The most of a job's input `GET /v1/jobs/{id}/input` shows (a browser's page, not a dump)."""


def load_input(engine: Engine, job_id: str) -> str | None:
    """A stored job's input, as JSON text (blocking)."""
    with engine.connect() as conn:
        found = conn.execute(select(tables.jobs.c.input).where(tables.jobs.c.id == job_id)).first()
    return None if found is None else str(found[0])


def input_view(text: str, limit: int = INPUT_VIEW_BYTES) -> dict[str, Any]:
    """The input's first `limit` bytes of UTF-8, cut before a character rather than in one."""
    if text.isascii():
        return {"input": text[:limit], "bytes": len(text), "truncated": len(text) > limit}
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return {"input": text, "bytes": len(data), "truncated": False}
    cut = data[:limit].decode("utf-8", "ignore")  # drops only the character cut in two
    return {"input": cut, "bytes": len(data), "truncated": True}
