"""The audit trail: who did what, when, and how it ended; append-only.

Events go through the store's writer like every other write (batched, off the request path), so
auditing a call costs it no disk wait. Nothing in the API edits or deletes an event, and on SQLite
a trigger refuses UPDATE and DELETE on the table as well.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Engine, insert, or_, select

from ember.store import tables
from ember.store.writer import Writer, execute

MAX_DETAIL = 2000


class AuditLog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.writer: Writer | None = None
        """Set once the control plane starts; events before that are written directly."""

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
        if self.writer is not None:
            self.writer.submit(execute(insert(tables.audit), row), urgent=False)
        else:
            with self.engine.begin() as conn:
                conn.execute(insert(tables.audit), row)

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
        (a failed authentication with an unknown token), for the server operator."""
        a = tables.audit.c
        q = select(tables.audit).order_by(a.id.desc()).limit(limit)
        if unattributed:
            q = q.where(or_(a.workspace == workspace, a.workspace.is_(None)))
        else:
            q = q.where(a.workspace == workspace)
        if since is not None:
            q = q.where(a.ts >= since)
        if until is not None:
            q = q.where(a.ts < until)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        for r in rows:
            r["detail"] = json.loads(r["detail"]) if r["detail"] else None
        return rows[::-1]
