"""A single writer thread that groups queued writes into one transaction (group commit).

Callers on the event loop enqueue a statement and, when they need durability before answering
(an accepted `/run`), await the returned future; everyone else fires and forgets. Under load, one
commit covers many jobs, so the store is never the bottleneck. Within a batch, consecutive runs of
one statement with a row each (a job accepted, a job finished) go to the database as one
executemany: one compiled statement for the lot, not one per row.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine

log = logging.getLogger("ember.store")

Op = Callable[[Connection], None]
_STOP = object()


class Writer:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.loop = engine, loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ember-writer", daemon=True)
        self._thread.start()

    def submit(self, op: Op) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.loop.create_future()
        self._queue.put((op, fut))
        return fut

    def close(self) -> None:
        """Write everything queued so far, then stop."""
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < 512:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            items = [item for item in batch if item is not _STOP]
            if items:
                self._write(items)
            if stop:
                return

    def _write(self, items: list[tuple[Op, asyncio.Future[None]]]) -> None:
        error: BaseException | None = None
        try:
            with self.engine.begin() as conn:
                for op in _grouped([op for op, _ in items]):
                    op(conn)
        except BaseException as exc:  # one bad op must not lose the others: retry one by one
            error = exc
        if error is not None and len(items) > 1:
            for item in items:
                self._write([item])
            return
        if error is not None:
            log.error("a store write failed: %r", error)
        for _, fut in items:
            self.loop.call_soon_threadsafe(_settle, fut, error)


@dataclass(frozen=True, slots=True)
class Execute:
    """An Op running one statement, with optional parameters: a dict, or a list of dicts."""

    stmt: Any
    params: Any = None

    def __call__(self, conn: Connection) -> None:
        if self.params is None:
            conn.execute(self.stmt)
        else:
            conn.execute(self.stmt, self.params)


execute = Execute


def _grouped(ops: list[Op]) -> list[Op]:
    """`ops` in order, with each run of one statement on single rows of the same columns joined
    into one Execute of all their rows."""
    out: list[Op] = []
    rows: list[dict[str, Any]] = []  # the rows of out[-1], while it is a group
    for op in ops:
        if isinstance(op, Execute) and isinstance(op.params, dict):
            last = out[-1] if out else None
            if (
                rows
                and isinstance(last, Execute)
                and last.stmt is op.stmt
                and rows[0].keys() == op.params.keys()
            ):
                rows.append(op.params)
                continue
            rows = [op.params]
            out.append(Execute(op.stmt, rows))
        else:
            rows = []
            out.append(op)
    return [
        Execute(op.stmt, op.params[0])
        if isinstance(op, Execute) and isinstance(op.params, list) and len(op.params) == 1
        else op
        for op in out
    ]


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
