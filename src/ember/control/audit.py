"""The audit trail: who did what, when, and how it ended; append-only.

Events go through the store's writer like every other write (batched, off the request path), so
auditing a call costs it no disk wait. Nothing in the API edits or deletes an event, and on SQLite
a trigger refuses UPDATE and DELETE on the table as well.

Refused requests without a valid token are the one thing anybody can send without limit, so they
are not one row each: per source address, action, reason and minute there is one row, written at
the first refusal (the evidence is in the store at once), whose `count` and `last_ts` grow at
each checkpoint while more arrive. That is the only UPDATE the trigger lets through. A flood from
one address costs a row a minute per reason; from more sources than `MAX_SOURCES` in one minute,
the rest share one row whose source is `*`. Every event a token is behind stays one row.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, insert, or_, select, update

from ember.store import tables
from ember.store.writer import Writer, execute

MAX_DETAIL = 2000
INTERVAL_S = 60.0
"""Refusals without a valid token are counted per source and reason in intervals this long."""
MAX_SOURCES = 1024
"""Distinct (source, action, reason) counters per interval; past them, one shared counter."""
OTHERS = "*"
"""The source of the counter shared past `MAX_SOURCES`."""

RefusalKey = tuple[str | None, str, str | None]
"""(source address, action, detail): what one counter counts."""


@dataclass
class Refusals:
    """The counter of one source's refusals in one interval."""

    interval: float
    count: int
    last: float
    written: int
    """The count the store holds (or will, once queued writes commit)."""
    row_id: int | None = None
    """Set by the writer thread once the row is inserted."""


class AuditLog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.writer: Writer | None = None
        """Set once the control plane starts; events before that are written directly."""
        self._refusals: dict[RefusalKey, Refusals] = {}

    def record(
        self,
        *,
        workspace: str | None,
        actor: str,
        action: str,
        outcome: str,
        target: str | None = None,
        detail: dict[str, Any] | None = None,
        ip: str | None = None,
    ) -> None:
        text = json.dumps(detail, sort_keys=True) if detail else None
        if text is not None and len(text) > MAX_DETAIL:
            text = text[: MAX_DETAIL - 3] + "..."
        row = {
            "ts": time.time(),
            "workspace": workspace,
            "actor": actor[:140],
            "action": action,
            "target": None if target is None else target[:255],
            "outcome": outcome,
            "detail": text,
            "ip": ip,
        }
        if workspace is None and actor == "anonymous":
            self._refused(row)
        elif self.writer is not None:
            self.writer.submit(execute(insert(tables.audit), row), urgent=False)
        else:
            with self.engine.begin() as conn:
                conn.execute(insert(tables.audit), row)

    def _refused(self, row: dict[str, Any]) -> None:
        """Count a refusal without a valid token: a new row only for the first of its source,
        action and reason in this interval."""
        now = row["ts"]
        interval = math.floor(now / INTERVAL_S) * INTERVAL_S
        key: RefusalKey = (row["ip"], row["action"], row["detail"])
        counter = self._refusals.get(key)
        if counter is None and len(self._refusals) >= MAX_SOURCES:
            why = f"refusals from more than {MAX_SOURCES} sources and reasons in a minute"
            row = {**row, "ip": OTHERS, "target": None, "detail": json.dumps({"why": why})}
            key = (OTHERS, row["action"], None)
            counter = self._refusals.get(key)
        if counter is not None and counter.interval == interval:
            counter.count += 1
            counter.last = now
            return
        if counter is not None:
            self._write_counts([counter])  # the previous interval's last refusals
        counter = self._refusals[key] = Refusals(interval, 1, now, 1)
        row = {**row, "count": 1, "last_ts": now}

        def insert_row(conn: Connection) -> None:
            key = conn.execute(insert(tables.audit), row).inserted_primary_key
            counter.row_id = None if key is None else key[0]

        if self.writer is not None:
            self.writer.submit(insert_row, urgent=False)
        else:
            with self.engine.begin() as conn:
                insert_row(conn)

    def checkpoint(self, now: float) -> None:
        """Write the counts that grew since the last checkpoint; forget past intervals."""
        self._write_counts([c for c in self._refusals.values() if c.count > c.written])
        current = math.floor(now / INTERVAL_S) * INTERVAL_S
        self._refusals = {k: c for k, c in self._refusals.items() if c.interval >= current}

    def _write_counts(self, counters: list[Refusals]) -> None:
        grown = [(c, c.count, c.last) for c in counters if c.count > c.written]
        if not grown:
            return
        for c, count, _ in grown:
            c.written = count
        a = tables.audit.c

        def write(conn: Connection) -> None:
            for c, count, last in grown:
                if c.row_id is not None:  # its insert ran first: one writer, in order
                    conn.execute(
                        update(tables.audit)
                        .where(a.id == c.row_id)
                        .values(count=count, last_ts=last)
                    )

        if self.writer is not None:
            self.writer.submit(write, urgent=False)
        else:
            with self.engine.begin() as conn:
                write(conn)

    def read(
        self,
        workspace: str,
        since: float | None,
        until: float | None,
        limit: int,
        *,
        unattributed: bool = False,
    ) -> list[dict[str, Any]]:
        """A workspace's events, oldest first; `unattributed` adds the events no workspace owns
        (a failed authentication with an unknown token), for the server operator. A row of
        counted refusals is in the window when its first or last refusal is."""
        a = tables.audit.c
        q = select(tables.audit).order_by(a.id.desc()).limit(limit)
        if unattributed:
            q = q.where(or_(a.workspace == workspace, a.workspace.is_(None)))
        else:
            q = q.where(a.workspace == workspace)
        if since is not None:  # a counter's last refusal is at most INTERVAL_S after its first
            q = q.where(a.ts >= since - INTERVAL_S, or_(a.ts >= since, a.last_ts >= since))
        if until is not None:
            q = q.where(a.ts < until)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        for r in rows:
            r["detail"] = json.loads(r["detail"]) if r["detail"] else None
        return rows[::-1]
