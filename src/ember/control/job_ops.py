"""The control plane's job calls: submit, read, cancel, retry, purge, and a job's end.

`JobOps` is a part of `ControlPlane` (plane.py), its base class, kept in a module of its own so
that neither stays long: it reaches the rooms through the attributes the plane sets in its
`__init__` (declared below) and, like the plane, is the only kind of module that knows several
rooms. Everything here runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from ember.backends.base import Backend
from ember.control import job_rows, views
from ember.control.cluster import Cluster
from ember.control.deployments import Deployments
from ember.control.dispatch import Dispatcher
from ember.control.errors import NotFoundError, RetryRefused, UnplaceableError, job_error
from ember.control.governance import Governance
from ember.control.jobs import JobBook
from ember.control.records import Job, Pool
from ember.control.series import Series
from ember.control.webhooks import Webhooks
from ember.core import runpod
from ember.core.jobs import JobOptions, JobStatus
from ember.core.placement import Never, place
from ember.store.writer import Writer, execute

RETRYABLE = frozenset(s.value for s in (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED))
SETTLE_S = 30.0
"""How long a retry waits for the final row of a job that has just ended."""


class JobOps:
    engine: Engine
    backend: Backend
    deployments: Deployments
    governance: Governance
    jobs: JobBook
    cluster: Cluster
    dispatch: Dispatcher
    webhooks: Webhooks
    series: Series
    writer: Writer
    _scale_soon: Callable[[Pool], None]

    def submit(
        self,
        workspace: str,
        app: str,
        fn: str,
        input: Any,
        *,
        policy: str | None = None,
        token: str | None = None,
        idempotency_key: str | None = None,
        options: JobOptions | None = None,
    ) -> Job:
        """Accept a job (`stored` makes it durable); one under a key waits for `submit_once`.
        `options`: what the caller asked beyond the input (None, the warm path's, costs nothing).

        Under a usage policy, the budget is checked here, before the job exists: once a `block`
        policy has spent its budget, calls are refused and only jobs already admitted run on.
        """
        state, meta = self.deployments.lookup(workspace, app, fn)
        assert meta is not None
        meta.validate(input)
        spec = meta.spec
        rules = self.governance.rules(workspace, policy)
        if rules is not None:
            self.governance.admit(workspace, rules)
        request = self.governance.gpu_request(spec, rules)
        if request:
            fit = place(request, spec.gpu_memory_mib, self.backend.inventory, ())
            if isinstance(fit, Never):
                raise UnplaceableError(fit.reason)
        # The tags its worker's usage carries (`_start_worker`): the app's, the function's, the
        # policy's, each over the one before.
        tags = {**state.tags, **spec.tags, **(rules.tags if rules else {})}
        job = self.jobs.accept(
            workspace,
            app,
            meta,
            input,
            policy=policy,
            token=token,
            tags=tags,
            key=idempotency_key,
            options=options,
        )
        if idempotency_key is None:
            if self.cluster.leading:
                self._enqueue(state.pool(meta.unit, policy), job)
            else:
                self.cluster.accepted(job)
        return job

    async def submit_once(
        self,
        workspace: str,
        app: str,
        fn: str,
        input: Any,
        key: str,
        *,
        policy: str | None = None,
        token: str | None = None,
        options: JobOptions | None = None,
    ) -> Job | dict[str, Any]:
        """`submit` under an `Idempotency-Key`: a repeat gets the job the key names (live, or
        its stored body), a new request under a used key an IdempotencyConflict. A new job runs
        once its row holds the key, so that two servers on one store never both run it."""
        return await self.jobs.once(
            workspace,
            key,
            (app, fn, input),
            lambda: self.submit(
                workspace,
                app,
                fn,
                input,
                policy=policy,
                token=token,
                idempotency_key=key,
                options=options,
            ),
            self._claimed,
        )

    def _claimed(self, job: Job) -> None:
        if not self.cluster.leading or (self.cluster.lease and job.owner is None):  # as stored
            self.cluster.accepted(job)
        elif (pool := self._home(job)) is not None:
            self._enqueue(pool, job)

    def _home(self, job: Job) -> Pool | None:
        """The pool a job joins now; a job whose function is no longer deployed fails."""
        pool = self.deployments.home_of(job)
        if pool is None:
            error = job_error("FunctionNotFound", f"{job.app}/{job.function} is no longer deployed")
            self.jobs.finish(job, JobStatus.FAILED, error=error)
        return pool

    def _enqueue(self, pool: Pool, job: Job) -> None:
        self.dispatch.enqueue(pool, job)
        self._scale_soon(pool)

    def stored(self, job: Job) -> asyncio.Future[None]:
        """Make an accepted job durable: resolves once its row is in the store."""
        return self.cluster.stored(job, self.jobs.store(job))

    async def get_job(self, workspace: str, job_id: str) -> Job | dict[str, Any]:
        return await self.cluster.get(workspace, job_id)

    def cancel(self, job: Job) -> None:
        self.dispatch.cancel(job, self.deployments.pool_of(job))

    def _job_ended(self, job: Job) -> None:
        self.series.record(job)
        if (pool := self.deployments.pool_of(job)) is not None:
            pool.last_call_end = job.finished
        if job.options is not None and job.options.webhook is not None:
            body = job.body()
            if job.options.via == "runpod":
                body = runpod.status_body(body, job.worker.id if job.worker else None)
            self.webhooks.send(job.options.webhook, job.id, body)

    # ----------------------------------------------------------------- retry, purge
    async def retry(self, workspace: str, job_id: str) -> Job:
        """Queue an ended job (FAILED, TIMED_OUT or CANCELLED) again under its id, on its
        function's current deployment: output, error, timings, cost and attempts cleared, its
        options kept, `created_at` now (its ttl counts from the retry). RetryRefused for a job
        queued, running or completed; NotFoundError for one this workspace does not have."""
        found = await self.jobs.get(workspace, job_id)
        status = found.status.value if isinstance(found, Job) else found["status"]
        if status not in RETRYABLE:
            raise RetryRefused(
                f"job {job_id} is {status}: only a job that ended FAILED, TIMED_OUT or "
                "CANCELLED can be retried"
            )
        deadline = time.monotonic() + SETTLE_S
        while job_id in self.jobs.jobs:  # ended just now: its final row is on its way
            if time.monotonic() > deadline:
                raise RetryRefused(f"job {job_id} has ended but its end is not stored yet")
            await asyncio.sleep(0.01)
        row = await asyncio.to_thread(job_rows.load_row, self.engine, job_id)
        if row is None or row["workspace"] != workspace:
            raise NotFoundError("job_not_found", f"no job with id {job_id!r} in this workspace")
        if row["status"] not in RETRYABLE or job_id in self.jobs.jobs:  # a twin retried it
            raise RetryRefused(f"job {job_id} is being retried already")
        self.jobs.recent.pop(job_id, None)
        key = (workspace, row["app"], row["function"])
        ended = self.jobs.counts.get(key, Counter())
        if ended[row["status"]] > 0:
            ended[row["status"]] -= 1
        self.jobs.retried[key] += 1
        (job,) = self.jobs.recover([row])
        job.created_at, job.created, job.attempts = time.time(), time.monotonic(), 0
        job.owner = self.jobs.owner
        params = {"job_id": job_id, "created_at": job.created_at, "owned_by": job.owner}
        job.stored = reopened = self.writer.submit(execute(job_rows.REOPEN_JOB, params))
        if (pool := self._home(job)) is not None:  # after the row's update: its end goes later
            self._enqueue(pool, job)
        await reopened
        return job

    def purge(self, workspace: str, app: str, fn: str) -> int:
        """Cancel every queued job of the function (running ones run on); how many."""
        state, meta = self.deployments.lookup(workspace, app, fn)
        assert meta is not None
        removed = 0
        for pool in state.all_pools():
            if pool.unit != meta.unit:
                continue
            gone = [
                j for j in pool.queue if j.function == meta.name and j.status is JobStatus.IN_QUEUE
            ]
            if not gone:
                continue
            kept = [j for j in pool.queue if j.function != meta.name]
            pool.queue.clear()
            pool.queue.extend(kept)
            for job in gone:
                self.jobs.finish(job, JobStatus.CANCELLED, error=None)
            removed += len(gone)
            self._scale_soon(pool)
        return removed

    def health(self, workspace: str, app: str, fn: str) -> dict[str, Any]:
        state, meta = self.deployments.lookup(workspace, app, fn)
        assert meta is not None
        key = (workspace, app, fn)
        counts = self.jobs.counts.get(key, Counter())
        tally = views.tally(counts, self.jobs.jobs.values(), key, self.jobs.retried[key])
        return views.health(state, meta.unit, tally)

    # ----------------------------------------------------------------- browsing
    async def list_jobs(
        self, which: job_rows.Listing, limit: int
    ) -> tuple[list[dict[str, Any]], tuple[float, str] | None]:
        """A page of the workspace's jobs, newest first, and where the next one starts (None:
        the last page). Jobs in flight are read from memory: their rows may be behind (the
        store is written in the background) or not written yet (a runsync answered first)."""
        live = {j.id: j for j in self.jobs.jobs.values() if j.workspace == which.workspace}
        found = [job_rows.summary(j.body()) for j in live.values() if which.admits(j)]
        after, stored = which.after, 0
        while stored <= limit:
            page = dataclasses.replace(which, after=after)
            batch = await asyncio.to_thread(job_rows.listing, self.engine, page, limit + 1)
            kept = [r for r in batch if r["id"] not in live]
            found += kept
            stored += len(kept)
            if len(batch) <= limit:
                break
            after = (batch[-1]["created_at"], batch[-1]["id"])
        found.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
        if len(found) <= limit:
            return found, None
        last = found[limit - 1]
        return found[:limit], (last["created_at"], last["id"])

    async def job_input(self, workspace: str, job_id: str) -> dict[str, Any]:
        """A job's input as JSON text, cut for a page; NotFoundError as for `get_job`."""
        found = await self.jobs.get(workspace, job_id)
        if isinstance(found, Job):
            return job_rows.input_view(found.input_json)
        text = await asyncio.to_thread(job_rows.load_input, self.engine, job_id)
        if text is None:  # pruned since
            raise NotFoundError("job_not_found", f"no job with id {job_id!r} in this workspace")
        return job_rows.input_view(text)

    def series_view(
        self, workspace: str, app: str | None, fn: str | None, window: int, step: int
    ) -> dict[str, Any]:
        """The last `window` s of calls and workers (`core.series.BadQuery` for bad ranges)."""
        return self.series.view(workspace, app, fn, window, step, time.time())
