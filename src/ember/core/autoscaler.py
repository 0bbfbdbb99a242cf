"""How many workers a function should have: a pure policy over a snapshot of its pool.

Rule: desired = ceil((queued + running) / concurrency) + buffer_workers, clamped to
[min_workers, max_workers]. Missing workers start at once (no timer wait from zero). Surplus
workers are stopped only when idle for at least `idle_timeout`, least recently used first, so the
most recently used (warmest caches) are kept. Starting and busy workers are never stopped. (A
surplus idle worker whose GPU another pool's queued jobs wait for goes sooner: `core.reclaim`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from ember.core.spec import ScalingSpec


class WorkerState(StrEnum):
    STARTING = "STARTING"
    IDLE = "IDLE"
    BUSY = "BUSY"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"


@dataclass(frozen=True)
class WorkerView:
    id: str
    state: WorkerState
    idle_since: float | None = None
    """When the worker last became idle (None unless IDLE)."""
    last_used: float = 0.0


@dataclass(frozen=True)
class PoolView:
    queued: int
    running: int
    workers: tuple[WorkerView, ...]


@dataclass(frozen=True)
class Decision:
    start: int = 0
    stop: tuple[str, ...] = ()


def desired_workers(pool: PoolView, spec: ScalingSpec, floor: int | None = None) -> int:
    """`floor` replaces `min_workers` when a warm schedule or pre-warming sets it
    (`ember.core.prewarm.worker_floor`); it never goes past `max_workers`."""
    demand = math.ceil((pool.queued + pool.running) / spec.concurrency)
    lo = spec.min_workers if floor is None else min(floor, spec.max_workers)
    return max(lo, min(spec.max_workers, demand + spec.buffer_workers))


def decide(pool: PoolView, spec: ScalingSpec, now: float, floor: int | None = None) -> Decision:
    live = [
        w
        for w in pool.workers
        if w.state in (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)
    ]
    desired = desired_workers(pool, spec, floor)
    if len(live) < desired:
        return Decision(start=desired - len(live))
    surplus = len(live) - desired
    if surplus == 0:
        return Decision()
    expired = [
        w
        for w in live
        if w.state is WorkerState.IDLE
        and w.idle_since is not None
        and now - w.idle_since >= spec.idle_timeout
    ]
    expired.sort(key=lambda w: (w.last_used, w.id))
    return Decision(stop=tuple(w.id for w in expired[:surplus]))


def next_expiry(pool: PoolView, spec: ScalingSpec) -> float | None:
    """When the next idle worker becomes eligible to stop: lets the shell sleep until then."""
    times = [
        w.idle_since + spec.idle_timeout
        for w in pool.workers
        if w.state is WorkerState.IDLE and w.idle_since is not None
    ]
    return min(times) if times else None
