"""Job states and the pure rules for what happens to a job when things go wrong."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self not in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS)


def should_retry(attempts: int, retries: int) -> bool:
    """`attempts` counts failed attempts so far, this one included; `retries` is the spec's."""
    return attempts <= retries


def startup_backoff(consecutive_failures: int) -> float:
    """Seconds to wait before starting another worker after workers failed to start."""
    if consecutive_failures <= 0:
        return 0.0
    return float(min(30.0, 0.25 * 2 ** (consecutive_failures - 1)))
