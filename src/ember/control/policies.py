"""Usage policies in the live server: the policies of each workspace, what each has spent this
period, and budget alerts. The rules themselves (admission, periods, caps) are `core.budgets`.

Spend is kept in memory as daily buckets per (workspace, policy), loaded from the usage records
at start and fed by the meter as it cuts records, so a budget check on the request path reads no
store. What a live worker has used since its last record is added at check time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from typing import Any

import httpx
from sqlalchemy import Connection, Integer, cast, func, select, update

from ember.core.budgets import Policy, day_index, period_bounds, spent_in_period
from ember.store import tables

log = logging.getLogger("ember.policies")

WEBHOOK_ATTEMPTS = 5
WEBHOOK_TIMEOUT_S = 5.0
SPEND_HISTORY_DAYS = 32
"""Enough daily buckets for the longest period (a month)."""

Key = tuple[str, str]
"""(workspace, policy name)"""


class Spend:
    """Money spent per (workspace, policy), in UTC-day buckets."""

    def __init__(self) -> None:
        self._daily: dict[Key, dict[int, float]] = defaultdict(lambda: defaultdict(float))

    def load(self, conn: Connection, now: float) -> None:
        u = tables.usage.c
        day = cast(u.start / 86400, Integer)  # the UTC day number: SQLite's CAST truncates,
        if conn.dialect.name == "postgresql":  # PostgreSQL's rounds
            day = cast(func.floor(u.start / 86400), Integer)
        rows = conn.execute(
            select(u.workspace, u.policy, day, func.sum(u.usd))
            .where(u.policy.is_not(None), u.start >= now - SPEND_HISTORY_DAYS * 86400)
            .group_by(u.workspace, u.policy, day)
        ).all()
        daily: dict[Key, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        for ws, policy, d, usd in rows:
            daily[(ws, policy)][int(d)] += float(usd or 0.0)
        self._daily = daily  # one swap: a standby loads again every second (control/plane.py)

    def add(self, key: Key, start: float, usd: float) -> None:
        if usd:
            self._daily[key][day_index(start)] += usd

    def in_period(self, key: Key, policy: Policy, now: float) -> float:
        start, _ = period_bounds(policy.period, now)
        return spent_in_period(self._daily.get(key, {}), start)


class PolicyBook:
    """The policies of every workspace, and when each last sent a budget alert."""

    def __init__(self) -> None:
        self.policies: dict[Key, Policy] = {}
        self.alerted: dict[Key, float] = {}
        """The period (its start) each policy last alerted in: one alert per period."""
        self.created_at: dict[Key, float] = {}

    def load(self, conn: Connection) -> None:
        """Every policy as stored, swapped in whole (a standby loads again every second)."""
        policies: dict[Key, Policy] = {}
        created_at: dict[Key, float] = {}
        alerted: dict[Key, float] = {}
        for row in conn.execute(select(tables.policies)).mappings():
            key = (row["workspace"], row["name"])
            policies[key] = Policy.from_dict(json.loads(row["body"]))
            created_at[key] = row["created_at"]
            if row["alerted_period"] is not None:
                alerted[key] = row["alerted_period"]
        self.policies, self.created_at, self.alerted = policies, created_at, alerted

    def of(self, workspace: str) -> list[Policy]:
        return sorted(
            (p for (ws, _), p in self.policies.items() if ws == workspace), key=lambda p: p.name
        )


def mark_alerted(conn: Connection, key: Key, period_start: float) -> None:
    """Remembered across restarts: a restart does not send the period's alert again."""
    p = tables.policies.c
    conn.execute(
        update(tables.policies)
        .where(p.workspace == key[0], p.name == key[1])
        .values(alerted_period=period_start)
    )


async def post_webhook(url: str, payload: dict[str, Any]) -> bool:
    """POST an alert, retried with backoff on errors and 5xx; True once it was taken."""
    delay = 0.5
    async with httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S) as client:
        for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
            try:
                r = await client.post(url, json=payload)
                if r.status_code < 500 and r.status_code != 429:
                    if r.status_code >= 400:
                        log.warning(
                            "budget webhook %s refused the alert: HTTP %s", url, r.status_code
                        )
                    return r.status_code < 400
                problem = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < WEBHOOK_ATTEMPTS:
                log.info("budget webhook %s failed (%s); retrying in %.1f s", url, problem, delay)
                await asyncio.sleep(delay)
                delay *= 2
    log.warning("budget webhook %s failed %d times; giving up", url, WEBHOOK_ATTEMPTS)
    return False


def alert_payload(key: Key, policy: Policy, spent: float, now: float) -> dict[str, Any]:
    start, reset = period_bounds(policy.period, now)
    return {
        "event": "budget_reached",
        "workspace": key[0],
        "policy": policy.name,
        "action": policy.action,
        "budget_usd": policy.budget_usd,
        "spent_usd": round(spent, 6),
        "period": policy.period,
        "period_start": start,
        "reset_at": reset,
        "tags": dict(policy.tags),
        "sent_at": time.time(),
    }
