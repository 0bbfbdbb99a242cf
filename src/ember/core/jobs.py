"""Job states and the pure rules for what happens to a job when things go wrong."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum


class JobStatus(StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @functools.cached_property
    def terminal(self) -> bool:
        """Asked several times per call on the warm path: worked out once per state."""
        return self not in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS)


def should_retry(attempts: int, retries: int) -> bool:
    """`attempts` counts failed attempts so far, this one included; `retries` is the spec's."""
    return attempts <= retries


STARTUP_FAILURES_BEFORE_FAILING_JOBS = 3


def fail_queued_on_startup_failure(consecutive_failures: int, reported_error: bool) -> bool:
    """Whether jobs waiting for a worker should fail now: at once when the worker said why it
    could not start (an import error, an @enter hook that raised: starting another would fail
    the same way), else after a few silent failures in a row (a crash we cannot explain)."""
    return reported_error or consecutive_failures >= STARTUP_FAILURES_BEFORE_FAILING_JOBS


def startup_backoff(consecutive_failures: int) -> float:
    """Seconds to wait before starting another worker after workers failed to start."""
    if consecutive_failures <= 0:
        return 0.0
    return float(min(30.0, 0.25 * 2 ** (consecutive_failures - 1)))


@dataclass(frozen=True, slots=True)
class JobOptions:
    """What a caller may ask of one job beyond its input (the native body's `webhook`, `ttl` and
    `timeout`, RunPod's `webhook` and `policy`). None everywhere is a plain job: the warm path
    passes no options at all."""

    webhook: str | None = None
    """An http(s) URL the server POSTs the job's body to once it ends (retried)."""
    ttl_s: float | None = None
    """A job still queued this long after it was submitted ends TIMED_OUT without running."""
    timeout_s: float | None = None
    """The job's own execution timeout, in place of its function's `timeout`."""
    retain_s: float | None = None
    """How long the ended job is kept (its status readable); None: the server's retention."""
    via: str = "v1"
    """The API it came through, which shapes its webhook's body: `v1` or `runpod`."""
