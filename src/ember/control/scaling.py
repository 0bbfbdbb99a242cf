"""Pools and scaling: how many workers each pool should have, and where new ones go.

`Scaler.plan` reads a pool and the facts it needs (the policy's rules and budget, the GPUs in
use) through `Facts`, calls the pure core (`autoscaler.decide`, `prewarm.worker_floor`,
`placement.place`, `budgets.gpu_cap`, `reclaim.reclaim`) and returns a `Plan`: workers to start
with their GPUs, workers to drain (its own idle ones, and idle workers of other pools whose GPUs
its queued jobs wait for), an error to fail the queue with. The plane carries a plan out; this
room starts, stops and fails nothing itself. It also keeps each pool's start-up backoff.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
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
from ember.core.reclaim import LIVE, Holder, Need, reclaim
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
    live: Callable[[], Iterable[Worker]]
    """Every live worker, of every pool: what each holds, in which state."""
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
    def __init__(
        self, facts: Facts, inventory: tuple[Gpu, ...] | Callable[[], tuple[Gpu, ...]]
    ) -> None:
        self.facts = facts
        self._inventory = inventory
        """The GPUs, or how to read them now: a cluster's nodes join and leave (Ray)."""

    @property
    def inventory(self) -> tuple[Gpu, ...]:
        inv = self._inventory
        return inv() if callable(inv) else inv

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
        view = self._view(pool)
        scaling = pool.spec.scaling
        floor = self._floor(pool, now)
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
        request: tuple[GpuRequest, ...] = ()
        gpu_taken = False  # the GPUs it needs are held by others (not a cap, not a backoff)
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
                    allocations = self._allocations()
                fit = place(request, pool.spec.gpu_memory_mib, self.inventory, allocations)
                gpu_taken = isinstance(fit, Wait)
            if isinstance(fit, Placed) and rules is not None and fit.gpus:
                if held is None:
                    held = self.facts.gpus_held(pool.workspace, rules.name)
                if (reason := gpu_cap(rules, len(held), len(fit.gpus))) is not None:
                    fit = Wait(reason)
            if isinstance(fit, Wait):
                pool.wait_reason = fit.reason
                break
            if isinstance(fit, Never):  # not with these GPUs (a node that left: as a crash)
                plan.fail = job_error("NoFittingGpu", fit.reason)
                break
            plan.start.append(fit)
            if fit.gpus:  # the next worker of this plan sees this one's GPUs taken
                assert allocations is not None
                allocations = [*allocations, Allocation("(planned)", fit.gpus, fit.memory_mib)]
                if held is not None:
                    held = held | set(fit.gpus)
        if gpu_taken and allocations is not None:
            wanted = min(decision.start, self._demand(pool) - self._live(pool)) - len(plan.start)
            reclaimed = self._reclaim(pool, request, rules, wanted, allocations, now)
            if reclaimed:
                pool.wait_reason = f"{pool.wait_reason}; an idle worker is giving one up"
            plan.drain += reclaimed
        for job in pool.queue:
            job.reason = pool.wait_reason
        plan.drain += [(pool.workers[wid], "idle") for wid in decision.stop]
        return plan

    # ----------------------------------------------------------------- reclaiming idle GPUs
    def _reclaim(
        self,
        pool: Pool,
        request: tuple[GpuRequest, ...],
        rules: Policy | None,
        wanted: int,
        allocations: list[Allocation],
        now: float,
    ) -> list[tuple[Worker, str]]:
        """Idle workers of other pools to drain now, so that the `wanted` workers this pool's
        queued jobs wait for get the GPUs those hold (`core.reclaim`), not after their
        `idle_timeout`. Each victim's own pool keeps what its scaling spec asks for."""
        if wanted < 1 or not pool.queue:
            return []
        workers = [w for w in self.facts.live() if w.gpus]
        pools = {id(w.pool): w.pool for w in workers if w.pool is not pool}
        keep = {str(k): self._desired(p, now) for k, p in pools.items()}
        holders = [
            Holder(
                w.id,
                str(id(w.pool)),
                w.state,
                w.gpus,
                w.gpu_memory_mib,
                w.idle_since if w.state is WorkerState.IDLE else None,
            )
            for w in workers
        ]
        # the workers this plan starts hold their GPUs too, and are nobody's to drain
        known = {w.id for w in workers}
        planned = [a for a in allocations if a.worker_id not in known]
        holders += [
            Holder(f"(planned {i})", str(id(pool)), WorkerState.STARTING, a.gpus, a.memory_mib)
            for i, a in enumerate(planned)
        ]
        need = Need(str(id(pool)), request, pool.spec.gpu_memory_mib, wanted)
        served = reclaim(self.inventory, holders, keep, [need])
        if rules is not None and served:  # the policy's GPU cap holds for reclaimed GPUs too
            held = len(self.facts.gpus_held(pool.workspace, rules.name))
            held += sum(len(a.gpus) for a in planned)
            capped = []
            for s in served:
                if gpu_cap(rules, held, len(s.placed.gpus)) is not None:
                    break
                capped.append(s)
                held += len(s.placed.gpus)
            served = tuple(capped)
        by_id = {w.id: w for w in workers}
        drained = [(by_id[wid], self._why(by_id[wid], pool)) for s in served for wid in s.drain]
        for w, _ in drained:
            log.info(
                "draining idle worker %s of %s/%s: its GPU goes to %s/%s",
                w.id,
                w.pool.app,
                w.pool.unit,
                pool.app,
                pool.unit,
            )
        return drained

    @staticmethod
    def _why(victim: Worker, to: Pool) -> str:
        """The victim's stop reason: the pool it gave way to, named only inside its workspace."""
        if victim.pool.workspace == to.workspace:
            return f"idle; GPU reclaimed for {to.app}/{to.unit}"
        return "idle; GPU reclaimed for a job of another workspace"

    # ----------------------------------------------------------------- a pool's numbers
    def _allocations(self) -> list[Allocation]:
        return [Allocation(w.id, w.gpus, w.gpu_memory_mib) for w in self.facts.live() if w.gpus]

    @staticmethod
    def _view(pool: Pool) -> PoolView:
        running = sum(w.active_jobs for w in pool.workers.values())
        return PoolView(len(pool.queue), running, tuple(w.view() for w in pool.workers.values()))

    @staticmethod
    def _floor(pool: Pool, now: float) -> int | None:
        """The pre-warm or warm-schedule floor that replaces `min_workers`, if any."""
        scaling = pool.spec.scaling
        if scaling.prewarm or scaling.warm_schedule:
            return worker_floor(scaling, pool.hist, pool.last_call_end, now, datetime.now())
        return None

    def _desired(self, pool: Pool, now: float) -> int:
        """How many live workers the pool's scaling spec keeps now (none once retired)."""
        if not pool.active:
            return 0
        return autoscaler.desired_workers(
            self._view(pool), pool.spec.scaling, self._floor(pool, now)
        )

    @staticmethod
    def _demand(pool: Pool) -> int:
        """Workers its queued and running jobs fill: what reclaiming may serve (not buffers)."""
        running = sum(w.active_jobs for w in pool.workers.values())
        return math.ceil((len(pool.queue) + running) / pool.spec.scaling.concurrency)

    @staticmethod
    def _live(pool: Pool) -> int:
        return sum(1 for w in pool.workers.values() if w.state in LIVE)

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
