"""Job intake and job state: jobs in flight, the recent ones, counts, and recovery at start.

A job is accepted here (its row queued for the store), ended here (timings, cost, the final row)
and read back here, from memory while it is in flight or recent, from the store after. Which
worker runs it and when is the dispatcher's business; this room learns of it only through the
job record (and `track`, which dispatch calls as a job leaves or rejoins a queue) and tells the
plane that a job ended through `on_finished`.

It also bounds what a workspace may queue (`core.quotas.admit` over counts kept here, so the check
costs no store read) and prunes finished jobs past their retention period (`prune_forever`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from ember.control import job_rows
from ember.control.errors import (
    BudgetBlocked,
    IdempotencyConflict,
    InputError,
    NotFoundError,
    PolicyDenied,
    QueueFullError,
    UnplaceableError,
)
from ember.control.records import FunctionMeta, Job
from ember.core.idempotency import conflict_message, digest
from ember.core.jobs import JobOptions, JobStatus
from ember.core.metering import job_cost
from ember.core.pricing import PriceTable
from ember.core.quotas import PRUNE_BATCH, Queued, Quotas, admit, duration_text, prune_every
from ember.core.timings import job_timings
from ember.store import tables
from ember.store.writer import Writer, execute

log = logging.getLogger("ember.control")

RECENT_JOBS = 4096

ID_BYTES = 12
"""Job ids are `job-` and 24 hex digits from the OS's cryptographic source (`os.urandom`, what
`secrets.token_hex` reads, without its two Python calls): the ids one workspace sees reveal
nothing of another's traffic (a seeded generator is replayed from 208 of its ids). It costs what
formatting a seeded generator's integer did, about a microsecond (docs/benchmarks.md)."""

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""Inputs as compact JSON (a request body parsed as JSON always encodes back)."""

Counts = dict[tuple[str, str, str], Counter[str]]
"""(workspace, app, function) -> jobs ended per status, since the store began."""


_REPLAYABLE = (
    BudgetBlocked,
    PolicyDenied,
    NotFoundError,
    InputError,
    UnplaceableError,
    QueueFullError,
)
"""What a new job is refused with that a repeat of a job accepted before is not."""


def _size(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding it when it is ASCII (the usual input)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class JobBook:
    def __init__(
        self,
        engine: Engine,
        prices: PriceTable,
        on_finished: Callable[[Job], None],
        quotas: Quotas | None = None,
    ) -> None:
        self.engine = engine
        self.prices = prices
        self.on_finished = on_finished
        self.quotas = quotas or Quotas()
        self._queued_jobs: Counter[str] = Counter()
        self._queued_bytes: Counter[str] = Counter()
        """Per workspace: its IN_QUEUE jobs and their encoded inputs (what `admit` bounds)."""
        self._counted: dict[str, int] = {}
        """Job id -> input bytes, for each job in those counts: `track` is idempotent."""
        """Told of every job that ends, after its state is final (its pool's call history)."""
        self.jobs: dict[str, Job] = {}
        """Accepted and not yet stored in its final state."""
        self.recent: OrderedDict[str, Job] = OrderedDict()
        self.counts: Counts = {}
        self.retried: Counter[tuple[str, str, str]] = Counter()
        """(workspace, app, function) -> jobs queued again by a retry, since this server began."""
        self._claims: dict[tuple[str, str], asyncio.Future[Job | dict[str, Any] | None]] = {}
        """(workspace, Idempotency-Key) -> the job it names, for the jobs accepted here under a
        key, from their row's INSERT until their final row is stored."""
        self._insert_once = job_rows.insert_unless_keyed(engine)
        self.owner: int | None = None
        """The epoch of the scheduler lease this server holds (control/lease.py): the mark its
        jobs' rows carry, and the only one under which it writes their end. None: it is the
        only server of its store, or it stands by."""
        self.elsewhere: dict[str, tuple[int, int]] = {}
        """On a standby: per workspace, the jobs and bytes queued in the store when last read,
        counted with its own against the queue's limits."""
        self.writer: Writer
        """Set once the plane starts."""

    # ----------------------------------------------------------------- recovery
    def load(self, conn: Connection, epoch: int | None = None) -> list[Any]:
        """Read the job counts; return the rows of jobs accepted but never finished (under a
        lease's `epoch`: marked as its scheduler's first, so that no earlier one may end them)."""
        j = tables.jobs.c
        counts = conn.execute(
            select(j.workspace, j.app, j.function, j.status, func.count()).group_by(
                j.workspace, j.app, j.function, j.status
            )
        ).all()
        for ws, app, fn, status, n in counts:
            self.counts.setdefault((ws, app, fn), Counter())[status] += n
        self.elsewhere = {}  # scheduling from now on: every queued job is counted here
        if epoch is not None:
            return job_rows.take(conn, epoch, all_unfinished=True)
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
                idempotency_key=row["idempotency_key"],
                request_digest=row["request_digest"],
                options=job_rows.options_of(row),
            )
            job.stored = stored
            self.jobs[job.id] = job
            self.track(job)  # counted, never refused: it was accepted before the restart
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
        key: str | None = None,
        options: JobOptions | None = None,
    ) -> Job:
        """A new job, in memory; `store` (or `once`, for a job under an Idempotency-Key) makes
        it durable. Raises QueueFullError, before anything exists of the job, when the
        workspace's queue is at one of its limits."""
        input_json = _encode(input)
        full = admit(self.queued(workspace), _size(input_json), self.quotas)
        if full is not None:
            raise QueueFullError(full)
        job = Job(
            id="job-" + os.urandom(ID_BYTES).hex(),
            app=app,
            function=meta.name,
            unit=meta.unit,
            input=input,
            input_json=input_json,
            created_at=time.time(),
            created=time.monotonic(),
            kind=meta.kind,
            workspace=workspace,
            policy=policy,
            token=token,
            tags=tags,
            options=options,
        )
        if key is not None:
            job.idempotency_key, job.request_digest = key, digest(app, meta.name, input_json)
        self.jobs[job.id] = job
        self.track(job)
        return job

    # ----------------------------------------------------------------- idempotent intake
    async def once(
        self,
        workspace: str,
        key: str,
        call: tuple[str, str, Any],
        submit: Callable[[], Job],
        claimed: Callable[[Job], None],
    ) -> Job | dict[str, Any]:
        """The job `key` names in the workspace, or a new one from `submit()` (`accept` with
        the key), handed to `claimed` once its row holds the key: the store's unique index, not
        this server's memory, decides which of two twins (here or on another server) is the job.
        Raises IdempotencyConflict when the key names a job of another `call` (app, fn, input)."""
        claim = self._claims.get((workspace, key))
        found = None if claim is None else await asyncio.shield(claim)  # a twin here: its job
        job = None
        if found is None:
            try:
                job = submit()
            except _REPLAYABLE:  # refused now; a repeat of a job accepted before is not
                found = await asyncio.to_thread(job_rows.load_keyed, self.engine, workspace, key)
                if found is None:
                    raise
            else:
                found = await self._claim(job)
                if found is None:  # pruned between the conflict and the read: all but never
                    raise RuntimeError(f"the job under Idempotency-Key {key!r} just vanished")
                if found is job:
                    claimed(job)
                    return job
        app, fn, input = call
        mine = job.request_digest if job is not None else digest(app, fn, _encode(input))
        if isinstance(found, Job):
            theirs = found.request_digest
        else:  # a stored body, perhaps one a twin has too
            found = dict(found)
            theirs = found.pop("request_digest")
        if theirs != mine:
            raise IdempotencyConflict(conflict_message(key))
        return found

    async def _claim(self, job: Job) -> Job | dict[str, Any] | None:
        """Insert the job's row unless a row holds its key already: the job, or else the job
        of that row (live, when this server runs it), this one forgotten as never accepted."""
        assert job.idempotency_key is not None
        key = (job.workspace, job.idempotency_key)
        claim = self._claims[key] = asyncio.get_running_loop().create_future()
        job.owner = self.owner
        insert = job_rows.InsertOnce(self._insert_once, job_rows.row(job, job.owner))
        found: Job | dict[str, Any] | None = None
        try:
            job.stored = self.writer.submit(insert)
            await job.stored
            found = (
                job
                if insert.inserted
                else await asyncio.to_thread(job_rows.load_keyed, self.engine, *key)
            )
        finally:
            if found is not job:
                self._drop(job)
                del self._claims[key]
            claim.set_result(found)  # None: it failed, and a waiting twin tries for itself
        if isinstance(found, dict):
            live = self.jobs.get(found["id"]) or self.recent.get(found["id"])
            if live is not None:
                return live
        return found

    def ended_elsewhere(self, job: Job, body: dict[str, Any]) -> None:
        """A job this standby accepted ended on the scheduler: its waiters here get its end as
        stored (`body`, from `job_rows.ended`)."""
        if job.status.terminal:
            return
        job.status = JobStatus(body["status"])
        for name in ("output", "error", "timings", "cost", "attempts", "finished_at"):
            setattr(job, name, body[name])
        job.finished = time.monotonic()
        self.track(job)
        self.counts.setdefault((job.workspace, job.app, job.function), Counter())[
            job.status.value
        ] += 1
        job.done.set()
        job.notify()
        self._forget(job)
        self.recent.pop(job.id, None)  # read from the store from now on: the scheduler may retry it

    def let_go(self, job: Job) -> None:
        """A standby keeps a stored job only while a caller here waits for it: the store has
        it, and the scheduler ends it."""
        if job.stored is not None and job.stored.done():
            self._drop(job)

    def _drop(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self._uncount(job)

    def track(self, job: Job) -> None:
        """Bring the queue counts in line with the job's state: counted while IN_QUEUE (a new
        job, a requeued one, a recovered one), not once a worker has it or it ended."""
        counted = self._counted.get(job.id)
        if job.status is JobStatus.IN_QUEUE:
            if counted is None:
                size = self._counted[job.id] = _size(job.input_json)
                self._queued_jobs[job.workspace] += 1
                self._queued_bytes[job.workspace] += size
        elif counted is not None:
            self._uncount(job)

    def _uncount(self, job: Job) -> None:
        counted = self._counted.pop(job.id, None)
        if counted is not None:
            ws = job.workspace
            self._queued_jobs[ws] -= 1
            self._queued_bytes[ws] -= counted
            if not self._queued_jobs[ws]:
                del self._queued_jobs[ws], self._queued_bytes[ws]

    def queued(self, workspace: str) -> Queued:
        """What the workspace has queued now (on a standby, with the store's queue)."""
        jobs, size = self.elsewhere.get(workspace, (0, 0))
        return Queued(self._queued_jobs[workspace] + jobs, self._queued_bytes[workspace] + size)

    def store(self, job: Job) -> asyncio.Future[None]:
        """Queue the job's row (once); the future resolves once it is in the store.

        A `/run` job is stored before its 202. A `/runsync` job is stored only when its caller
        is answered before it ends (a 202 with its id), or else at its end, as one INSERT of its
        final row: until then only its caller, on an open connection, knows it exists.
        """
        if job.stored is None:
            job.owner = self.owner
            row = job_rows.row(job, job.owner)
            job.stored = self.writer.submit(execute(job_rows.INSERT_JOB, row))
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
        self.track(job)
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
            op = execute(job_rows.INSERT_JOB, {**job_rows.row(job, self.owner), **final})
        elif self.owner is None:
            op = execute(job_rows.FINISH_JOB, {"job_id": job.id, **final})
        else:  # fenced: a no-op once a later scheduler has taken the job over
            op = execute(job_rows.FINISH_OWNED, {"job_id": job.id, "owned_by": self.owner, **final})
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
        if job.idempotency_key is not None:
            self._claims.pop((job.workspace, job.idempotency_key), None)
        self.recent[job.id] = job
        while len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)

    # ----------------------------------------------------------------- reading
    async def get(self, workspace: str, job_id: str) -> Job | dict[str, Any]:
        """A job of the workspace: live from memory, or its stored body."""
        job = self.jobs.get(job_id) or self.recent.get(job_id)
        o = None if job is None else job.options
        if (
            job is not None
            and o is not None
            and job_rows.past_retention(job.finished_at, o.retain_s, time.time())
        ):
            job = None  # ended, and kept as long as it asked: read as pruned
        if job is not None and job.workspace == workspace:
            return job
        row = (
            None
            if job is not None
            else await asyncio.to_thread(job_rows.load_job, self.engine, job_id)
        )
        if row is None or row.pop("workspace") != workspace:
            raise NotFoundError(
                "job_not_found",
                f"no job with id {job_id!r} in this workspace (finished jobs are kept for "
                f"{duration_text(self.quotas.job_retention_s)}, then pruned: the server's "
                "--job-retention)",
            )
        return row

    # ----------------------------------------------------------------- retention
    async def prune_forever(self) -> None:
        """Prune finished jobs past the retention period, every `prune_every` of it."""
        every = prune_every(self.quotas.job_retention_s)
        while True:
            await asyncio.sleep(every)
            try:
                await self.prune(time.time())
            except Exception:  # a failed pass is retried at the next one
                log.exception("pruning finished jobs failed")

    async def prune(self, now: float) -> int:
        """Delete the records of jobs that ended before `now - retention`, `PRUNE_BATCH` rows
        per transaction, through the store's writer (the event loop never runs a DELETE), and
        drop them from the recent cache. Queued and running jobs have no `finished_at`: they
        are never pruned. Returns how many rows went."""
        cutoff = now - self.quotas.job_retention_s
        while self.recent:
            oldest = next(iter(self.recent.values()))
            if oldest.finished_at is None or oldest.finished_at >= cutoff:
                break
            self.recent.popitem(last=False)
        deleted: list[int] = []  # each batch's count, appended in the writer's thread
        while True:
            await self.writer.submit(
                lambda conn: deleted.append(job_rows.prune_batch(conn, cutoff, now))
            )
            if not deleted or deleted[-1] < PRUNE_BATCH:
                return sum(deleted)
            await asyncio.sleep(0.01)  # let the writes queued behind this batch go first
