"""Governance: usage policies, what each has spent, budget checks and alerts, GPU limits.

The rules are `core.budgets`; this room holds the policies of every workspace and their spend,
answers the questions the other rooms ask (may this call run, what does this worker cost so far,
is this budget spent) and sends each period's budget alert once. What the workers of a policy
hold and use is read through `live_workers`, never by reaching into the workers room.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from sqlalchemy import Connection, delete, insert

from ember.control.errors import BudgetBlocked, ConflictError, NotFoundError, PolicyDenied
from ember.control.policies import PolicyBook, Spend, alert_payload, mark_alerted, post_webhook
from ember.control.records import Pool, Worker
from ember.core.budgets import (
    Policy,
    PolicyError,
    admit,
    alert_due,
    period_bounds,
    policy_request,
)
from ember.core.metering import UsageRecord
from ember.core.pricing import PriceTable, rate
from ember.core.spec import FunctionSpec, GpuRequest
from ember.store import tables
from ember.store.writer import Writer, execute

log = logging.getLogger("ember.control")

AuditRecord = Callable[..., None]
"""`AuditLog.record`: keyword arguments workspace, actor, action, outcome, target, detail."""


class Governance:
    def __init__(
        self,
        prices: PriceTable,
        live_workers: Callable[[], Iterable[Worker]],
        audit: AuditRecord,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
    ) -> None:
        self.prices = prices
        self.live_workers = live_workers
        self.audit = audit
        self.spawn = spawn
        self.policies = PolicyBook()
        self.spend = Spend()
        self.writer: Writer
        """Set once the plane starts."""

    def load(self, conn: Connection, now: float) -> None:
        self.policies.load(conn)
        self.spend.load(conn, now)

    def record_spend(self, r: UsageRecord) -> None:
        """Every usage record as the meter cuts it: budgets count it at once."""
        self.spend.add((r.workspace, r.policy or ""), r.start, r.usd)

    # ----------------------------------------------------------------- admission
    def rules(self, workspace: str, name: str | None) -> Policy | None:
        """The rules of a caller's policy (None: no policy); a policy gone under a live token
        refuses the call."""
        if name is None:
            return None
        rules = self.policies.policies.get((workspace, name))
        if rules is None:  # deleting a policy needs its tokens gone first; this is a race
            raise PolicyDenied(f"the token's policy {name!r} no longer exists")
        return rules

    def rules_of(self, pool: Pool) -> Policy | None:
        return self.policies.policies.get((pool.workspace, pool.policy or ""))

    def admit(self, workspace: str, rules: Policy) -> None:
        """Raise BudgetBlocked once a `block` policy has spent its budget for the period."""
        now = time.time()
        blocked = admit(rules, self.spent(workspace, rules, now), now)
        if blocked is not None:
            raise BudgetBlocked(blocked)

    @staticmethod
    def gpu_request(spec: FunctionSpec, rules: Policy | None) -> tuple[GpuRequest, ...]:
        """The GPUs a function's workers ask for under the policy's GPU options."""
        try:
            return policy_request(rules, spec.gpu)
        except PolicyError as exc:
            raise PolicyDenied(str(exc)) from None

    def spent(self, workspace: str, rules: Policy, now: float) -> float:
        """A policy's spend this period: its records, plus what its live workers have used
        since their last record (not yet cut)."""
        total = self.spend.in_period((workspace, rules.name), rules, now)
        for w in self.live_workers():
            pool = w.pool
            if pool.policy == rules.name and pool.workspace == workspace and w.seg_phase:
                total += rate(w.resources, self.prices) * max(0.0, now - w.seg_start)
        return total

    def blocked(self, workspace: str, rules: Policy) -> bool:
        if rules.action != "block" or rules.budget_usd is None:
            return False
        now = time.time()
        return admit(rules, self.spent(workspace, rules, now), now) is not None

    def gpus_held(self, workspace: str, policy: str) -> set[int]:
        """The GPUs the live workers of a policy's pools hold (its `max_gpus` counts these)."""
        return {
            i
            for w in self.live_workers()
            if w.pool.policy == policy and w.pool.workspace == workspace
            for i in w.gpus
        }

    # ----------------------------------------------------------------- alerts
    def check_budgets(self) -> None:
        """At every checkpoint: a policy that reached its budget alerts once per period."""
        now = time.time()
        for key, rules in list(self.policies.policies.items()):
            if rules.budget_usd is None:
                continue
            spent = self.spent(key[0], rules, now)
            if not alert_due(rules, spent, now, self.policies.alerted.get(key)):
                continue
            start, _ = period_bounds(rules.period, now)
            self.policies.alerted[key] = start
            self.writer.submit(functools.partial(mark_alerted, key=key, period_start=start))
            payload = alert_payload(key, rules, spent, now)
            log.warning(
                "budget: policy %r of workspace %r spent $%.4f of its $%.2f %s budget (%s)",
                rules.name,
                key[0],
                spent,
                rules.budget_usd,
                rules.period,
                "new calls are refused" if rules.action == "block" else "alert only",
            )
            self.audit(
                workspace=key[0],
                actor="server",
                action="budget.reached",
                target=f"policy:{rules.name}",
                outcome="blocked" if rules.action == "block" else "alerted",
                detail={"spent_usd": round(spent, 6), "budget_usd": rules.budget_usd},
            )
            if rules.webhook:
                self.spawn(post_webhook(rules.webhook, payload))

    # ----------------------------------------------------------------- the policies
    def status(self, workspace: str, rules: Policy) -> dict[str, Any]:
        now = time.time()
        start, reset = period_bounds(rules.period, now)
        spent = self.spent(workspace, rules, now)
        return {
            **rules.to_dict(),
            "created_at": self.policies.created_at.get((workspace, rules.name)),
            "spent_usd": round(spent, 9),
            "period_start": start,
            "reset_at": reset,
            "blocked": rules.action == "block" and admit(rules, spent, now) is not None,
            "gpus_held": len(self.gpus_held(workspace, rules.name)),
        }

    async def create(self, workspace: str, rules: Policy) -> dict[str, Any]:
        key = (workspace, rules.name)
        if key in self.policies.policies:
            raise ConflictError(
                f"policy {rules.name!r} exists; delete it first (`ember policy delete "
                f"{rules.name}`) or pick another name"
            )
        now = time.time()
        await self.writer.submit(
            execute(
                insert(tables.policies),
                {
                    "workspace": workspace,
                    "name": rules.name,
                    "body": json.dumps(rules.to_dict()),
                    "created_at": now,
                },
            )
        )
        self.policies.policies[key] = rules
        self.policies.created_at[key] = now
        return self.status(workspace, rules)

    async def delete(self, workspace: str, name: str) -> None:
        key = (workspace, name)
        if key not in self.policies.policies:
            raise NotFoundError("policy_not_found", f"no policy named {name!r}")
        p = tables.policies.c
        await self.writer.submit(
            execute(delete(tables.policies).where(p.workspace == workspace, p.name == name))
        )
        del self.policies.policies[key]
        self.policies.alerted.pop(key, None)
