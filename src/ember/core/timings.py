"""Per-job latency terms: total = queue + cold_start + load + exec + post, exactly.

A job's wait before it runs is split by what the worker it ran on was doing meanwhile: the part
of the wait that overlaps that worker's start is cold start, the part that overlaps its `@enter`
hooks is load, the rest is queue. So a job that arrived at a warm worker shows 0 for both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerStart:
    spawned: float
    connected: float
    """Process started, runtime imported, user module imported: ready to run @enter hooks."""
    ready: float
    """@enter hooks done."""


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    cold_start_ms: float
    load_ms: float
    exec_ms: float
    post_ms: float
    total_ms: float

    def to_dict(self) -> dict[str, float]:
        return {
            "queue_ms": self.queue_ms,
            "cold_start_ms": self.cold_start_ms,
            "load_ms": self.load_ms,
            "exec_ms": self.exec_ms,
            "post_ms": self.post_ms,
            "total_ms": self.total_ms,
        }


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def job_timings(
    *,
    created: float,
    dispatched: float | None,
    finished: float,
    exec_s: float | None,
    worker: WorkerStart | None,
) -> Timings:
    """All arguments are seconds on one monotonic clock; `exec_s` was measured by the worker.

    `exec_s=None`: the worker never reported (the job was cancelled, timed out, or its worker
    died), so its whole time on the worker counts as exec.
    """
    total = max(0.0, finished - created)
    if dispatched is None:  # never reached a worker (cancelled in queue, failed at start)
        return Timings(_ms(total), 0.0, 0.0, 0.0, 0.0, _ms(total))
    wait = max(0.0, dispatched - created)
    cold = load = 0.0
    if worker is not None:
        cold = _overlap(created, dispatched, worker.spawned, worker.connected)
        load = _overlap(created, dispatched, worker.connected, worker.ready)
    run = max(0.0, finished - dispatched)
    exec_s = run if exec_s is None else min(max(0.0, exec_s), run)
    queue_ms, cold_ms, load_ms, exec_ms = _ms(wait - cold - load), _ms(cold), _ms(load), _ms(exec_s)
    total_ms = _ms(total)
    post_ms = round(max(0.0, total_ms - queue_ms - cold_ms - load_ms - exec_ms), 3)
    return Timings(queue_ms, cold_ms, load_ms, exec_ms, post_ms, total_ms)
