"""The metering shell: turns worker state changes into usage records, written in batches, and
keeps their rollups; answers usage queries from both.

Each worker's life is one chain of records with shared boundaries (cold_start, then idle/busy),
also cut at every checkpoint, so the records of a worker add up to its lifetime to the
millisecond. Records are buffered in memory and written only at checkpoints, all in one
transaction with each live worker's `metered_until`: the store always holds a consistent
snapshot, and a server killed at any instant loses at most the time since the last checkpoint,
which is also where each worker's recorded life ends after the restart. Off the request path,
and a handful of writes per second however many jobs run.

The same transaction folds the new records into the usage rollups (`rollups.py`, which also
answers usage queries from them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, func, insert, select, update

from ember.control.records import Worker
from ember.control.rollups import fold_usage, row_cell, upsert
from ember.core.metering import Phase, Totals, UsageRecord, bucket_of, make_record, micros, pico
from ember.core.pricing import PriceTable, Resources, rounding_ms
from ember.core.rollup import SPANS
from ember.store import tables
from ember.store.writer import Writer


def usage_row(r: UsageRecord, tags_json: str) -> dict[str, Any]:
    """The `usage` table's row of a record (what the meter writes; benches and tests that fill
    a store directly write the same)."""
    return {
        "worker": r.worker,
        "app": r.app,
        "unit": r.unit,
        "version": r.version,
        "phase": r.phase.value,
        "start": r.start,
        "end": r.end,
        "billed_ms": r.billed_ms,
        "gpu_type": r.resources.gpu_type,
        "gpu_count": r.resources.gpu_count,
        "cpu": r.resources.cpu,
        "memory_gib": r.resources.memory_gib,
        "usd": r.usd,
        "tags": tags_json,
        "starts": r.starts,
        "workspace": r.workspace,
        "policy": r.policy,
    }


class Meter:
    def __init__(
        self, writer: Writer, prices: PriceTable, spend: Callable[[UsageRecord], None]
    ) -> None:
        self.writer = writer
        self.prices = prices
        self.spend = spend
        """Called with every record as it is cut: the policies' budgets count it at once."""
        self._new_workers: list[dict[str, Any]] = []
        self._records: list[dict[str, Any]] = []
        self._ended: list[dict[str, Any]] = []

    def begin(self, w: Worker, now: float, tags: Mapping[str, str]) -> None:
        w.tags = dict(tags)
        w.tags_json = json.dumps(w.tags)
        w.started_at = w.seg_start = w.metered_until = now
        w.seg_phase = Phase.COLD_START
        w.first_record = True
        self._new_workers.append(
            {
                "id": w.id,
                "app": w.pool.app,
                "unit": w.pool.unit,
                "version": w.pool.version,
                "gpus": json.dumps(list(w.gpus)),
                "started_at": now,
                "metered_until": now,
                "workspace": w.pool.workspace,
                "policy": w.pool.policy,
            }
        )

    def switch(self, w: Worker, phase: Phase, now: float) -> None:
        if w.seg_phase is None or phase is w.seg_phase:
            return
        self._cut(w, now)
        w.seg_phase = phase

    def end(self, w: Worker, now: float, exit_code: int | None, reason: str | None) -> None:
        if w.seg_phase is None:
            return
        # Rounded up from what the worker's records bill (each rounded to the microsecond), so
        # that their sum, not just the lifetime, comes to whole seconds.
        billed = w.billed_ms + max(0.0, now - w.seg_start) * 1000.0
        extra = rounding_ms(billed, self.prices.billing)
        self._cut(w, now, extra_billed_ms=extra)
        w.seg_phase = None
        self._ended.append({"wid": w.id, "t_end": now, "code": exit_code, "why": reason})

    def checkpoint(self, live: list[Worker], now: float) -> None:
        """Cut every live worker's open record at `now` and write all buffered metering."""
        progress = []
        for w in live:
            if w.seg_phase is None:
                continue
            if now > w.seg_start:
                self._cut(w, now)
            w.metered_until = now
            progress.append({"wid": w.id, "t": now})
        new, records, ended = self._new_workers, self._records, self._ended
        self._new_workers, self._records, self._ended = [], [], []
        if not (new or records or ended or progress):
            return
        wid = tables.workers.c.id

        def write(conn: Connection) -> None:
            if new:
                conn.execute(insert(tables.workers), new)
            if records:
                conn.execute(insert(tables.usage), records)
                fold_usage(conn)
            if progress:
                conn.execute(
                    update(tables.workers)
                    .where(wid == bindparam("wid"))
                    .values(metered_until=bindparam("t")),
                    progress,
                )
            if ended:
                conn.execute(
                    update(tables.workers)
                    .where(wid == bindparam("wid"))
                    .values(
                        ended_at=bindparam("t_end"),
                        metered_until=bindparam("t_end"),
                        exit_code=bindparam("code"),
                        stop_reason=bindparam("why"),
                    ),
                    ended,
                )

        self.writer.submit(write, urgent=False)

    def _cut(self, w: Worker, now: float, extra_billed_ms: float = 0.0) -> None:
        assert w.seg_phase is not None
        end = max(now, w.seg_start)
        record = make_record(
            worker=w.id,
            app=w.pool.app,
            unit=w.pool.unit,
            version=w.pool.version,
            phase=w.seg_phase,
            start=w.seg_start,
            end=end,
            resources=w.resources,
            prices=self.prices,
            tags=w.tags,
            starts=1 if w.first_record else 0,
            extra_billed_ms=extra_billed_ms,
            workspace=w.pool.workspace,
            policy=w.pool.policy,
        )
        if record.policy is not None:
            self.spend(record)
        w.first_record = False
        w.seg_start = end
        w.billed_ms += record.billed_ms
        self._records.append(usage_row(record, w.tags_json))


def round_up_orphans(conn: Connection, billing: str) -> None:
    """Per-second billing for workers of a killed server, which never reached `Meter.end`.

    Their life ends at their last checkpoint (`metered_until`); like any other worker's, their
    billed total rounds up to whole seconds, on their last billed record at its own rate.
    Call before those workers are marked ended.
    """
    if billing != "second":
        return
    fold_usage(conn)  # the rollup holds every record: the change below is added to it as a delta
    w, u = tables.workers.c, tables.usage.c
    orphans = conn.execute(select(w.id).where(w.ended_at.is_(None))).scalars().all()
    for wid in orphans:
        billed = conn.execute(select(func.sum(u.billed_ms)).where(u.worker == wid)).scalar()
        extra = rounding_ms(billed or 0.0, billing)
        last = conn.execute(
            select(u.id, u.billed_ms, u.usd)
            .where(u.worker == wid, u.billed_ms > 0)
            .order_by(u.id.desc())
            .limit(1)
        ).first()
        if not extra or last is None:
            continue
        billed = round(last.billed_ms + extra, 3)
        usd = last.usd * billed / last.billed_ms
        conn.execute(update(tables.usage).where(u.id == last.id).values(billed_ms=billed, usd=usd))
        row = conn.execute(select(tables.usage).where(u.id == last.id)).mappings().one()
        ws, start, shape, _ = row_cell(row, {})
        delta = Totals(micros(billed) - micros(last.billed_ms), pico(usd) - pico(last.usd))
        upsert(
            conn, {(span, ws, bucket_of(start, step), shape): delta for span, step in SPANS.items()}
        )


def end_orphans(conn: Connection, billing: str) -> None:
    """Workers of the previous run that never recorded their end (the server was killed) end
    where their metering does: at their last checkpoint (rounded up under per-second billing).
    Also folds into the rollups any record they do not hold yet."""
    fold_usage(conn)
    round_up_orphans(conn, billing)
    conn.execute(
        update(tables.workers)
        .where(tables.workers.c.ended_at.is_(None))
        .values(ended_at=tables.workers.c.metered_until, stop_reason="server stopped")
    )


def read_usage(
    engine: Engine, workspace: str, since: float | None, until: float | None
) -> list[UsageRecord]:
    """A workspace's usage records overlapping [since, until); blocking, run it in a thread."""
    q = select(tables.usage).where(tables.usage.c.workspace == workspace)
    if since is not None:
        q = q.where(tables.usage.c.end > since)
    if until is not None:
        q = q.where(tables.usage.c.start < until)
    with engine.connect() as conn:
        return [_usage_record(r) for r in conn.execute(q).mappings()]


def _usage_record(row: Any) -> UsageRecord:
    return UsageRecord(
        worker=row["worker"],
        app=row["app"],
        unit=row["unit"],
        version=row["version"],
        phase=Phase(row["phase"]),
        start=row["start"],
        end=row["end"],
        billed_ms=row["billed_ms"],
        resources=Resources(row["gpu_type"], row["gpu_count"], row["cpu"], row["memory_gib"]),
        usd=row["usd"],
        tags=json.loads(row["tags"]),
        starts=row["starts"],
        workspace=row["workspace"],
        policy=row["policy"],
    )
