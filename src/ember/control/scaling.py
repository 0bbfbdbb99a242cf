"""Pools and scaling: how many workers each pool should have, and where new ones go.

`Scaler.plan` reads a pool and the facts it needs (the policy's rules and budget, the GPUs in
use) through `Facts`, calls the pure core (`autoscaler.decide`, `prewarm.worker_floor`,
`placement.place`, `budgets.gpu_cap`) and returns a `Plan`: workers to start with their GPUs,
workers to drain, an error to fail the queue with. The plane carries a plan out; this room
starts, stops and fails nothing itself. It also keeps each pool's start-up backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ember.control.errors import PolicyDenied, job_error
from ember.control.records import Pool, Worker
from ember.core import autoscaler
from ember.core.autoscaler import PoolView, WorkerState
from ember.core.budgets import Policy, gpu_cap
from ember.core.jobs import fail_queued_on_startup_failure, startup_backoff
from ember.core.placement import Allocation, Gpu, Never, Placed, Wait, place
from ember.core.prewarm import worker_floor
from ember.core.spec import FunctionSpec, GpuRequest

log = logging.getLogger("ember.control")


@dataclass(frozen=True, slots=True)
class Facts:
    """What the scaler reads from the other rooms (the plane fills it in)."""

    rules_of: Callable[[Pool], Policy | None]
    """The usage policy of the pool's calls, if any."""
    blocked: Callable[[str, Policy], bool]
    """Whether a `block` policy of the workspace has spent its budget."""
    gpu_request: Callable[[FunctionSpec, Policy | None], tuple[GpuRequest, ...]]
    """The GPUs a worker asks for under the policy (raises PolicyDenied)."""
    allocations: Callable[[], list[Allocation]]
    """What every live worker holds."""
    gpus_held: Callable[[str, str], set[int]]
    """The GPUs held by the workers of (workspace, policy)."""


@dataclass
class Plan:
    start: list[Placed] = field(default_factory=list)
    drain: list[tuple[Worker, str]] = field(default_factory=list)
    """(worker, reason)"""
    fail: dict[str, Any] | None = None
    """No worker can ever run the queued jobs: they fail with this error."""


class Scaler:
    def __init__(self, facts: Facts, inventory: tuple[Gpu, ...]) -> None:
        self.facts = facts
        self.inventory = inventory

    def plan(self, pool: Pool) -> Plan:
        """What to do now so that the pool has the workers its queue and scaling spec ask for.

        Sets `wait_reason` on the pool and on its queued jobs (no GPU free, a GPU cap).
        """
        plan = Plan()
        now = time.monotonic()
        if not pool.active:
            plan.drain = [
                (w, "old version")
                for w in pool.workers.values()
                if w.state is not WorkerState.DRAINING
            ]
            return plan
        running = sum(w.active_jobs for w in pool.workers.values())
        view = PoolView(len(pool.queue), running, tuple(w.view() for w in pool.workers.values()))
        scaling = pool.spec.scaling
        floor = None
        if scaling.prewarm or scaling.warm_schedule:
            floor = worker_floor(scaling, pool.hist, pool.last_call_end, now, datetime.now())
        rules = self.facts.rules_of(pool)
        if rules is not None and not pool.queue and self.facts.blocked(pool.workspace, rules):
            # Spent: what is idle stops now, so the money stops with the jobs already admitted.
            plan.drain = [
                (w, f"policy {rules.name!r} reached its budget")
                for w in pool.workers.values()
                if w.state is WorkerState.IDLE
            ]
            return plan
        decision = autoscaler.decide(view, scaling, now, floor)
        pool.wait_reason = None
        allocations: list[Allocation] | None = None
        held: set[int] | None = None
        for _ in range(decision.start):
            if now < pool.next_start:
                break
            fit: Placed | Wait | Never
            try:
                request = self.facts.gpu_request(pool.spec, rules)
            except PolicyDenied as exc:  # the policy changed under queued jobs
                fit = Never(str(exc))
            else:
                if allocations is None:
                    allocations = self.facts.allocations()
                fit = place(request, pool.spec.gpu_memory_mib, self.inventory, allocations)
            if isinstance(fit, Placed) and rules is not None and fit.gpus:
                if held is None:
                    held = self.facts.gpus_held(pool.workspace, rules.name)
                if (reason := gpu_cap(rules, len(held), len(fit.gpus))) is not None:
                    fit = Wait(reason)
            if isinstance(fit, Wait):
                pool.wait_reason = fit.reason
                break
            if isinstance(fit, Never):  # the inventory cannot change under a running server
                plan.fail = job_error("NoFittingGpu", fit.reason)
                break
            plan.start.append(fit)
            if fit.gpus:  # the next worker of this plan sees this one's GPUs taken
                assert allocations is not None
                allocations = [*allocations, Allocation("(planned)", fit.gpus, fit.memory_mib)]
                if held is not None:
                    held = held | set(fit.gpus)
        for job in pool.queue:
            job.reason = pool.wait_reason
        plan.drain += [(pool.workers[wid], "idle") for wid in decision.stop]
        return plan

    # ----------------------------------------------------------------- start-up failures
    @staticmethod
    def started(pool: Pool) -> None:
        """A worker of the pool became ready: failures before it no longer count."""
        pool.startup_failures = 0

    @staticmethod
    def failed_to_start(pool: Pool, w: Worker, code: int) -> dict[str, Any] | None:
        """A worker died before it was ready: back off the next start; returns the error to
        fail the queued jobs with, when starting more would fail the same way."""
        pool.startup_failures += 1
        pool.next_start = time.monotonic() + startup_backoff(pool.startup_failures)
        err = w.fatal or job_error("WorkerExited", f"worker exited with code {code} while starting")
        log.warning(
            "worker %s of %s/%s failed to start: %s", w.id, pool.app, pool.unit, err["message"]
        )
        if fail_queued_on_startup_failure(pool.startup_failures, w.fatal is not None):
            return {**err, "message": f"worker failed to start: {err['message']}"}
        return None
