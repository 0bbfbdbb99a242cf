"""The metering shell: turns worker state changes into usage records, written in batches.

Each worker's life is one chain of records with shared boundaries (cold_start, then idle/busy),
also cut at every checkpoint, so the records of a worker add up to its lifetime to the
millisecond, and a server killed at any instant loses at most the time since the last checkpoint,
which is also where the worker's recorded life ends after the restart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import insert, update

from ember.control.records import Worker
from ember.core.metering import Phase, UsageRecord, make_record
from ember.core.pricing import PriceTable, rounding_ms
from ember.store import tables
from ember.store.writer import Writer, execute


def _usage_row(r: UsageRecord) -> dict[str, Any]:
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
        "tags": json.dumps(dict(r.tags)),
        "starts": r.starts,
    }


class Meter:
    def __init__(self, writer: Writer, prices: PriceTable) -> None:
        self.writer = writer
        self.prices = prices

    def _write(self, stmt: Any, params: Any = None) -> None:
        self.writer.submit(execute(stmt, params))

    def begin(self, w: Worker, now: float, tags: Mapping[str, str]) -> None:
        w.tags = dict(tags)
        w.started_at = w.seg_start = w.metered_until = now
        w.seg_phase = Phase.COLD_START
        w.first_record = True
        self._write(
            insert(tables.workers),
            {
                "id": w.id,
                "app": w.pool.app,
                "unit": w.pool.unit,
                "version": w.pool.version,
                "gpus": json.dumps(list(w.gpus)),
                "started_at": now,
                "metered_until": now,
            },
        )

    def switch(self, w: Worker, phase: Phase, now: float) -> None:
        if w.seg_phase is None or phase is w.seg_phase:
            return
        self._cut(w, now)
        w.seg_phase = phase

    def checkpoint(self, w: Worker, now: float) -> None:
        if w.seg_phase is None or now <= w.seg_start:
            return
        self._cut(w, now)
        w.metered_until = now
        self._write(
            update(tables.workers).where(tables.workers.c.id == w.id).values(metered_until=now)
        )

    def end(self, w: Worker, now: float, exit_code: int | None, reason: str | None) -> None:
        if w.seg_phase is None:
            return
        extra = rounding_ms((now - w.started_at) * 1000.0, self.prices.billing)
        self._cut(w, now, extra_billed_ms=extra)
        w.seg_phase = None
        self._write(
            update(tables.workers)
            .where(tables.workers.c.id == w.id)
            .values(ended_at=now, metered_until=now, exit_code=exit_code, stop_reason=reason)
        )

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
        )
        w.first_record = False
        w.seg_start = end
        self._write(insert(tables.usage), _usage_row(record))
