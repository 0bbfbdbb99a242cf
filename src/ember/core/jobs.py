"""Job states and the pure rules for what happens to a job when things go wrong."""

from __future__ import annotations

import functools
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
