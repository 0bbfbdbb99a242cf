"""Webhooks: a job's end POSTed to the URL its caller gave (`JobOptions.webhook`).

The scheduler (the server that ends jobs) hands each ended job's body here; a few senders POST
them, each retried with a backoff until one answer is a 2xx or the attempts run out. What waits
is bounded (`backlog`): past it a webhook is dropped, and logged. Deliveries live in memory
only: those still waiting when the server stops are lost (docs/api.md, "Webhooks").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import httpx

log = logging.getLogger("ember.control")

ATTEMPTS = 3
BACKOFF_S = (1.0, 5.0)
"""The waits before the second attempt and the third (the last one repeats beyond)."""
TIMEOUT_S = 10.0
CONCURRENCY = 8
BACKLOG = 10_000


class Webhooks:
    def __init__(
        self,
        *,
        attempts: int = ATTEMPTS,
        backoff_s: Sequence[float] = BACKOFF_S,
        timeout_s: float = TIMEOUT_S,
        concurrency: int = CONCURRENCY,
        backlog: int = BACKLOG,
    ) -> None:
        self.attempts = max(1, attempts)
        self.backoff_s = tuple(backoff_s) or (0.0,)
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.backlog = backlog
        self._queue: asyncio.Queue[tuple[str, str, Any]] | None = None
        self._senders: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self.delivered = self.dropped = self.failed = 0

    def send(self, url: str, job_id: str, body: Any) -> None:
        """POST `body` (JSON) to `url` soon, retried; never blocks, never raises."""
        if self._closed:
            return
        if self._queue is None:
            self._queue = asyncio.Queue(self.backlog)
            self._client = httpx.AsyncClient(timeout=self.timeout_s, trust_env=False)
            loop = asyncio.get_running_loop()
            self._senders = [loop.create_task(self._sender()) for _ in range(self.concurrency)]
        try:
            self._queue.put_nowait((url, job_id, body))
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("job %s: webhook dropped, %d deliveries already wait", job_id, self.backlog)

    async def _sender(self) -> None:
        assert self._queue is not None
        while True:
            url, job_id, body = await self._queue.get()
            try:
                await self._deliver(url, job_id, body)
            except Exception:  # a sender never dies of one delivery
                log.exception("job %s: webhook delivery failed", job_id)
            finally:
                self._queue.task_done()

    async def _deliver(self, url: str, job_id: str, body: Any) -> None:
        assert self._client is not None
        why = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s[min(attempt - 1, len(self.backoff_s) - 1)])
            try:
                response = await self._client.post(url, json=body)
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    self.delivered += 1
                    return
                why = f"HTTP {response.status_code}"
            log.info(
                "job %s: webhook attempt %d of %d: %s", job_id, attempt + 1, self.attempts, why
            )
        self.failed += 1
        log.warning("job %s: webhook given up after %d attempts (%s)", job_id, self.attempts, why)

    async def idle(self) -> None:
        """Wait until every webhook sent so far is delivered or given up (tests, shutdown)."""
        if self._queue is not None:
            await self._queue.join()

    async def close(self) -> None:
        """Stop sending; what still waits is lost (logged)."""
        self._closed = True
        waiting = self._queue.qsize() if self._queue is not None else 0
        if waiting:
            log.warning("stopping with %d webhook(s) undelivered", waiting)
        for task in self._senders:
            task.cancel()
        for task in self._senders:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
