"""A single writer thread that groups queued writes into one transaction (group commit).

Callers on the event loop enqueue a statement and, when they need durability before answering
(an accepted `/run`), await the returned future; everyone else fires and forgets. Under load, one
commit covers many jobs, so the store is never the bottleneck. A write nobody waits for
(`urgent=False`: a job's final row, metering, audit) may wait up to `LINGER_S` for company, so
that one commit also covers a few sequential calls; a write someone awaits goes at once, with
everything queued before it. Within a batch, consecutive runs of one statement with a row each
(jobs finished, say) go to the database as one executemany: one compiled statement for the lot.
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
LINGER_S = 0.005
"""How long writes nobody awaits may gather before they are committed together."""
BATCH = 512


class Writer:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.loop = engine, loop
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._urgent = threading.Event()
        """Set by a write somebody awaits: the batch goes now."""
        self._thread = threading.Thread(target=self._run, name="ember-writer", daemon=True)
        self._thread.start()

    def submit(self, op: Op, *, urgent: bool = True) -> asyncio.Future[None]:
        """Queue `op`; the future resolves once it is committed. `urgent=False`: nobody waits
        for it, so it may linger a moment to share a commit, and wakes the writer only when it is
        idle."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self._queue.put((op, fut))
        if urgent:
            self._urgent.set()
        return fut

    def close(self) -> None:
        """Write everything queued so far, then stop."""
        self._queue.put(_STOP)
        self._urgent.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]  # idle: the first write of a batch wakes the thread
            # Then the writes nobody awaits gather for up to LINGER_S, without waking it; a
            # write somebody awaits ends the wait at once.
            self._urgent.wait(LINGER_S)
            self._urgent.clear()
            while len(batch) < BATCH:
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
        # one wake-up of the event loop for the whole batch, not one per write
        self.loop.call_soon_threadsafe(_settle_all, [fut for _, fut in items], error)


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


def _settle_all(futs: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in futs:
        _settle(fut, error)


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
