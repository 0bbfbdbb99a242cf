"""Dispatch: queued jobs to workers with a free slot, their timeouts, results, cancels, retries.

This room owns each pool's queue and each worker's running jobs. It never starts or stops a
worker, ends a job's record or meters anything itself: it asks for those through `Outside`,
which the plane wires to the rooms that own them, and tells the plane through `settled` that a
pool's queue or free slots changed (the plane then asks the scaler).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ember.control.errors import job_error
from ember.control.records import Job, Pool, Worker
from ember.core.autoscaler import WorkerState
from ember.core.jobs import JobStatus, should_retry
from ember.core.metering import Phase
from ember.worker import protocol

log = logging.getLogger("ember.control")


class Finish(Protocol):
    def __call__(
        self, job: Job, status: JobStatus, *, output: Any = None, error: dict[str, Any] | None
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Outside:
    """What dispatch asks of the other rooms (the plane fills it in)."""

    finish: Finish
    """End a job's record (the job book)."""
    store_attempts: Callable[[Job], None]
    kill: Callable[[Worker, str], None]
    """Stop a worker now (the worker lifecycle)."""
    phase: Callable[[Worker, Phase], None]
    """The worker's metered phase changes: busy, idle (the meter)."""
    settled: Callable[[Pool], None]
    """The pool's queue or free slots changed (the scaler)."""
    home_of: Callable[[Job], Pool | None]
    """The current pool a requeued job goes back to; None if its function is gone."""
    track: Callable[[Job], None]
    """A job left its queue or rejoined it (the job book counts what each workspace queues)."""


class Dispatcher:
    def __init__(self, outside: Outside, cancel_grace_s: float) -> None:
        self.outside = outside
        self.cancel_grace_s = cancel_grace_s

    # ----------------------------------------------------------------- queueing
    def enqueue(self, pool: Pool, job: Job) -> None:
        """A new job joins its pool's queue; a call after a quiet spell feeds `prewarm="auto"`."""
        quiet = (
            pool.last_call_end is not None
            and not pool.queue
            and not any(w.has_active_jobs() for w in pool.workers.values())
        )
        self.restore(pool, job)
        self.pump(pool)
        if quiet and pool.last_call_end is not None:  # recorded once the job is on its way
            pool.hist = pool.hist.record(max(0.0, job.created - pool.last_call_end))

    def restore(self, pool: Pool, job: Job) -> None:
        """A job joins the end of its pool's queue (a new one, or one recovered at start), its
        ttl, if it has one, counting from its submission (wall clock: a restart keeps it)."""
        pool.queue.append(job)
        if job.options is not None and job.options.ttl_s is not None:
            left = job.created_at + job.options.ttl_s - time.time()
            job.timer = asyncio.get_running_loop().call_later(max(0.0, left), self._on_ttl, job)

    def _on_ttl(self, job: Job) -> None:
        if job.status is not JobStatus.IN_QUEUE or job.options is None:
            return
        ttl = job.options.ttl_s or 0.0
        left = job.created_at + ttl - time.time()
        if left > 0:  # the loop's clock runs apart from the wall clock: never end it early
            job.timer = asyncio.get_running_loop().call_later(left, self._on_ttl, job)
            return
        pool = self.outside.home_of(job)
        if pool is not None and job in pool.queue:
            pool.queue.remove(job)
        message = f"job waited in the queue past its ttl of {ttl:g} s; it never ran"
        self.outside.finish(job, JobStatus.TIMED_OUT, error=job_error("TTLExpired", message))
        if pool is not None:
            self.outside.settled(pool)

    def pump(self, pool: Pool) -> None:
        """Hand queued jobs to ready workers with a free slot, warmest first."""
        if not pool.active:
            return
        slots = pool.spec.scaling.concurrency
        while pool.queue:
            ready = [
                w
                for w in pool.workers.values()
                if w.state in (WorkerState.IDLE, WorkerState.BUSY) and len(w.running) < slots
            ]
            if not ready:
                return
            w = max(ready, key=lambda w: (w.state is WorkerState.BUSY, w.last_used))
            job = pool.queue.popleft()
            if job.status is not JobStatus.IN_QUEUE:
                continue
            self._dispatch(job, w)

    def _dispatch(self, job: Job, w: Worker) -> None:
        now = time.monotonic()
        job.status = JobStatus.IN_PROGRESS
        self.outside.track(job)
        job.dispatched = now
        job.worker = w
        job.worker_start = w.start
        w.running[job.id] = job
        if w.state is WorkerState.IDLE and w.idle_since is not None and w.last_job_done:
            job.idle_before_ms = (now - w.idle_since) * 1000.0
        w.state = WorkerState.BUSY
        w.idle_since = None
        job.reason = None
        self.outside.phase(w, Phase.BUSY)
        w.last_used = now
        assert w.writer is not None
        w.send(
            protocol.encode(
                {"t": "run", "job": job.id, "fn": job.function},
                raw={"input": job.input_json.encode()},
            )
        )
        if job.timer is not None:  # its ttl: it runs in time
            job.timer.cancel()
        job.timer = asyncio.get_running_loop().call_later(
            _timeout(job, w), self._on_timeout, job, w
        )
        job.notify()

    def _on_timeout(self, job: Job, w: Worker) -> None:
        if job.status is not JobStatus.IN_PROGRESS or job.worker is not w:
            return
        limit = _timeout(job, w)
        # The loop's timer clock may run behind time.monotonic(): never end a job early.
        left = (job.dispatched or 0.0) + limit - time.monotonic()
        if left > 0:
            job.timer = asyncio.get_running_loop().call_later(left, self._on_timeout, job, w)
            return
        self.outside.finish(
            job,
            JobStatus.TIMED_OUT,
            error=job_error(
                "TimeoutError", f"job ran past its timeout of {limit:g} s; its worker was stopped"
            ),
        )
        self.outside.kill(w, f"job {job.id} timed out")

    def _release(self, w: Worker, job_id: str) -> None:
        w.running.pop(job_id, None)
        if not w.running and w.state is WorkerState.BUSY:
            w.state = WorkerState.IDLE
            w.idle_since = time.monotonic()
            w.last_job_done = True
            self.outside.phase(w, Phase.IDLE)
        if w.state is WorkerState.DRAINING:
            return
        self.pump(w.pool)
        self.outside.settled(w.pool)

    # ----------------------------------------------------------------- what workers report
    def on_result(self, w: Worker, msg: dict[str, Any]) -> None:
        job = w.running.get(msg["job"])
        if job is None:
            return
        if not job.status.terminal:
            job.exec_ms = msg.get("exec_ms", 0.0)
            if msg.get("ok"):
                self.outside.finish(job, JobStatus.COMPLETED, output=msg.get("output"), error=None)
            elif msg.get("status") == "CANCELLED":
                self.outside.finish(job, JobStatus.CANCELLED, error=None)
            else:
                self._on_job_error(job, msg["error"])
        # The slot is freed (and the pool pumped and scaled) once the job's waiters have run.
        asyncio.get_running_loop().call_soon(self._release, w, job.id)

    def on_output(self, w: Worker, msg: dict[str, Any]) -> None:
        job = w.running.get(msg["job"])
        if job is not None and not job.status.terminal:
            job.outputs.append(msg["value"])
            job.notify()

    def on_progress(self, w: Worker, msg: dict[str, Any]) -> None:
        """RunPod's `progress_update`: the running job's latest progress, for status reads."""
        job = w.running.get(msg["job"])
        if job is not None and not job.status.terminal:
            job.progress = msg.get("value")
            job.notify()

    def _on_job_error(self, job: Job, error: dict[str, Any]) -> None:
        job.attempts += 1
        assert job.worker is not None
        if should_retry(job.attempts, job.worker.pool.spec.retries):
            self.outside.store_attempts(job)
            self.requeue(job)
            return
        self.outside.finish(job, JobStatus.FAILED, error=error)

    def worker_gone(self, w: Worker, code: int) -> None:
        """A worker exited: each of its unfinished jobs is requeued, retried or failed."""
        for job in list(w.running.values()):
            if job.status.terminal:
                continue
            if w.stop_reason is not None:
                # The server stopped this worker for another job's sake: not this job's fault.
                self.requeue(job)
                continue
            job.attempts += 1
            if should_retry(job.attempts, w.pool.spec.retries):
                log.warning("job %s: worker exited with code %s, retrying", job.id, code)
                self.outside.store_attempts(job)
                self.requeue(job)
            else:
                self.outside.finish(
                    job,
                    JobStatus.FAILED,
                    error=job_error(
                        "WorkerExited",
                        f"worker exited with code {code} while running the job"
                        + (f" (after {job.attempts} attempts)" if job.attempts > 1 else ""),
                    ),
                )
        w.running.clear()

    # ----------------------------------------------------------------- back to the queue
    def requeue(self, job: Job) -> None:
        """Put a job back at the head of its current pool's queue (a retry, a stopped worker)."""
        if job.timer is not None:
            job.timer.cancel()
        job.status, job.dispatched, job.worker, job.worker_start = (
            JobStatus.IN_QUEUE,
            None,
            None,
            None,
        )
        job.exec_ms = job.progress = None
        pool = self.outside.home_of(job)
        if pool is None:
            self.outside.finish(
                job, JobStatus.FAILED, error=job_error("FunctionNotFound", "no longer deployed")
            )
            return
        pool.queue.appendleft(job)
        self.outside.track(job)
        job.notify()

    def fail_queue(self, pool: Pool, error: dict[str, Any]) -> None:
        """Every job waiting in the pool fails with `error` (no worker can ever run them)."""
        while pool.queue:
            self.outside.finish(pool.queue.popleft(), JobStatus.FAILED, error=error)

    # ----------------------------------------------------------------- cancel
    def cancel(self, job: Job, pool: Pool | None) -> None:
        """Cancel a job: out of its queue, or its worker told to stop it (and stopped if it
        does not within the grace period: code in a C call or a sleep cannot be interrupted)."""
        if job.status.terminal:
            return
        if job.status is JobStatus.IN_QUEUE:
            if pool is not None and job in pool.queue:
                pool.queue.remove(job)
            self.outside.finish(job, JobStatus.CANCELLED, error=None)
            return
        w = job.worker
        self.outside.finish(job, JobStatus.CANCELLED, error=None)
        if w is not None and w.writer is not None:
            w.send(protocol.encode({"t": "cancel", "job": job.id}))
            asyncio.get_running_loop().call_later(
                self.cancel_grace_s, self._kill_if_still_running, w, job.id
            )

    def _kill_if_still_running(self, w: Worker, job_id: str) -> None:
        if job_id in w.running and w.state is not WorkerState.STOPPED:
            self.outside.kill(w, f"job {job_id} was cancelled and did not stop")


def _timeout(job: Job, w: Worker) -> float:
    """The job's own execution timeout, else its function's."""
    o = job.options
    return w.pool.spec.timeout if o is None or o.timeout_s is None else o.timeout_s
