"""Job intake and job state: jobs in flight, the recent ones, counts, and recovery at start.

A job is accepted here (its row queued for the store), ended here (timings, cost, the final row)
and read back here, from memory while it is in flight or recent, from the store after. Which
worker runs it and when is the dispatcher's business; this room learns of it only through the
job record and tells the plane that a job ended through `on_finished`.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, select, update

from ember.control.errors import NotFoundError
from ember.control.records import FunctionMeta, Job
from ember.core.jobs import JobStatus
from ember.core.metering import job_cost
from ember.core.pricing import PriceTable
from ember.core.timings import job_timings
from ember.store import tables
from ember.store.writer import Writer, execute

RECENT_JOBS = 4096

_ids = random.Random(secrets.randbits(128))
"""Job ids: unique, not secrets (a job is reached only from its own workspace), and drawn without
a system call per job, which costs more than the rest of building its id."""

_FINISH_JOB = (
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
"""Built once: building an UPDATE per job cost the event loop more than writing it."""
_INSERT_JOB = insert(tables.jobs)

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""Inputs as compact JSON (a request body parsed as JSON always encodes back)."""

Counts = dict[tuple[str, str, str], Counter[str]]
"""(workspace, app, function) -> jobs ended per status, since the store began."""


class JobBook:
    def __init__(
        self, engine: Engine, prices: PriceTable, on_finished: Callable[[Job], None]
    ) -> None:
        self.engine = engine
        self.prices = prices
        self.on_finished = on_finished
        """Told of every job that ends, after its state is final (its pool's call history)."""
        self.jobs: dict[str, Job] = {}
        """Accepted and not yet stored in its final state."""
        self.recent: OrderedDict[str, Job] = OrderedDict()
        self.counts: Counts = {}
        self.writer: Writer
        """Set once the plane starts."""

    # ----------------------------------------------------------------- recovery
    def load(self, conn: Connection) -> list[Any]:
        """Read the job counts; return the rows of jobs accepted but never finished."""
        j = tables.jobs.c
        counts = conn.execute(
            select(j.workspace, j.app, j.function, j.status, func.count()).group_by(
                j.workspace, j.app, j.function, j.status
            )
        ).all()
        for ws, app, fn, status, n in counts:
            self.counts.setdefault((ws, app, fn), Counter())[status] += n
        return list(
            conn.execute(
                select(tables.jobs)
                .where(j.status.in_([JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS]))
                .order_by(j.created_at)
            ).mappings()
        )

    def recover(self, rows: Iterable[Any]) -> list[Job]:
        """The jobs of `rows` (from `load`) in memory again, queued; the plane requeues them."""
        now_wall, now = time.time(), time.monotonic()
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stored.set_result(None)  # their rows are in the store already
        jobs = []
        for row in rows:
            job = Job(
                id=row["id"],
                app=row["app"],
                function=row["function"],
                unit="",
                input=json.loads(row["input"]),
                input_json=row["input"],
                created_at=row["created_at"],
                created=now - max(0.0, now_wall - row["created_at"]),
                attempts=row["attempts"],
                workspace=row["workspace"],
                policy=row["policy"],
                token=row["token"],
                tags=json.loads(row["tags"]) if row["tags"] else {},
            )
            job.stored = stored
            self.jobs[job.id] = job
            jobs.append(job)
        return jobs

    # ----------------------------------------------------------------- intake
    def accept(
        self,
        workspace: str,
        app: str,
        meta: FunctionMeta,
        input: Any,
        *,
        policy: str | None,
        token: str | None,
        tags: dict[str, str],
    ) -> Job:
        """A new job, in memory; `store` makes it durable."""
        job = Job(
            id=f"job-{_ids.getrandbits(96):024x}",
            app=app,
            function=meta.name,
            unit=meta.unit,
            input=input,
            input_json=_encode(input),
            created_at=time.time(),
            created=time.monotonic(),
            kind=meta.kind,
            workspace=workspace,
            policy=policy,
            token=token,
            tags=tags,
        )
        self.jobs[job.id] = job
        return job

    def store(self, job: Job) -> asyncio.Future[None]:
        """Queue the job's row (once); the future resolves once it is in the store.

        A `/run` job is stored before its 202. A `/runsync` job is stored only when its caller
        is answered before it ends (a 202 with its id), or else at its end, as one INSERT of its
        final row: until then only its caller, on an open connection, knows it exists.
        """
        if job.stored is None:
            job.stored = self.writer.submit(execute(_INSERT_JOB, _row(job)))
        return job.stored

    def store_attempts(self, job: Job) -> None:
        """A retry is remembered, so a server restart cannot grant a crashing job more tries
        (a job not stored yet carries its attempts in the row it is stored with)."""
        if job.stored is None:
            return
        stmt = update(tables.jobs).where(tables.jobs.c.id == job.id).values(attempts=job.attempts)
        self.writer.submit(execute(stmt), urgent=False)

    # ----------------------------------------------------------------- the end of a job
    def finish(
        self,
        job: Job,
        status: JobStatus,
        *,
        output: Any = None,
        error: dict[str, Any] | None,
    ) -> None:
        """End a job once: its timings and cost, its waiters woken, its final row written."""
        if job.status.terminal:
            return
        job.status = status
        job.output = job.outputs if job.is_generator and status is JobStatus.COMPLETED else output
        job.error = error
        job.finished = time.monotonic()
        job.finished_at = time.time()
        if job.timer is not None:
            job.timer.cancel()
        job.timings = job_timings(
            created=job.created,
            dispatched=job.dispatched,
            finished=job.finished,
            exec_s=None if job.exec_ms is None else job.exec_ms / 1000.0,
            worker=job.worker_start,
        ).to_dict()
        job.cost = self._cost(job)
        job.reason = None
        self.on_finished(job)
        self.counts.setdefault((job.workspace, job.app, job.function), Counter())[status.value] += 1
        job.done.set()
        job.notify()
        # Its row is written after its waiters have run: a runsync answer goes out first.
        asyncio.get_running_loop().call_soon(self._store_final, job)

    def _store_final(self, job: Job) -> None:
        error = job.error
        final = {
            "status": job.status.value,
            "output": None if job.output is None else json.dumps(job.output),
            "error": None if error is None else json.dumps(error),
            "timings": json.dumps(job.timings),
            "cost": json.dumps(job.cost),
            "attempts": job.attempts,
            "version": job.worker.pool.version if job.worker else None,
            "finished_at": job.finished_at,
        }
        if job.stored is None:  # never stored: one INSERT of its final row
            op = execute(_INSERT_JOB, {**_row(job), **final})
        else:
            op = execute(_FINISH_JOB, {"job_id": job.id, **final})
        job.stored = self.writer.submit(op, urgent=False)
        job.stored.add_done_callback(lambda _f: self._forget(job))

    def _cost(self, job: Job) -> dict[str, float]:
        w, t = job.worker, job.timings
        if w is None or t is None:
            return {"usd": 0.0, "gpu_seconds": 0.0, "cpu_seconds": 0.0}
        return job_cost(
            exec_ms=t["exec_ms"] + t["post_ms"],
            cold_start_ms=t["cold_start_ms"] + t["load_ms"],
            idle_before_ms=job.idle_before_ms,
            concurrency=w.pool.spec.scaling.concurrency,
            resources=w.resources,
            prices=self.prices,
        ).to_dict()

    def _forget(self, job: Job) -> None:
        """Once the final state is stored, keep the job only in the bounded recent cache."""
        self.jobs.pop(job.id, None)
        self.recent[job.id] = job
        while len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)

    # ----------------------------------------------------------------- reading
    async def get(self, workspace: str, job_id: str) -> Job | dict[str, Any]:
        """A job of the workspace: live from memory, or its stored body."""
        job = self.jobs.get(job_id) or self.recent.get(job_id)
        if job is not None and job.workspace == workspace:
            return job
        row = None if job is not None else await asyncio.to_thread(self._load_job, job_id)
        if row is None or row.pop("workspace") != workspace:
            raise NotFoundError("job_not_found", f"no job with id {job_id!r}")
        return row

    def _load_job(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(tables.jobs).where(tables.jobs.c.id == job_id))
                .mappings()
                .first()
            )
        if row is None:
            return None
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

    def tally(self, workspace: str, app: str, fn: str) -> dict[str, int]:
        """Jobs of one function by state: live ones counted in memory, ended ones since ever."""
        counts = self.counts.get((workspace, app, fn), Counter())
        live = [
            j
            for j in self.jobs.values()
            if j.app == app and j.function == fn and j.workspace == workspace
        ]
        return {
            "in_queue": sum(1 for j in live if j.status is JobStatus.IN_QUEUE),
            "in_progress": sum(1 for j in live if j.status is JobStatus.IN_PROGRESS),
            "completed": counts["COMPLETED"],
            "failed": counts["FAILED"],
            "cancelled": counts["CANCELLED"],
            "timed_out": counts["TIMED_OUT"],
        }


def _row(job: Job) -> dict[str, Any]:
    """A job's row as accepted: queued, no attempt yet."""
    return {
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
    }
