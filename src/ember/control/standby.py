"""A standby's waiting callers: jobs it wrote into the store, ended by the scheduler, read back.

A standby (a server of several on one store that does not hold the scheduler lease; see
control/lease.py) accepts a call by writing its row with no owner, and the scheduler takes it
from there. A caller that waits here for the end (`/runsync`, `GET /v1/jobs/{id}?wait=`) waits
on the job in memory; one read every POLL_S finds which of the waited-on jobs ended, for all of
them at once, so the store sees one query per interval however many callers wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ember.control.records import Job

log = logging.getLogger("ember.control")

POLL_S = 0.02
BATCH = 500
"""Ids per read: a long IN list costs the store more than a few short ones."""


class Watch:
    def __init__(
        self,
        read: Callable[[list[str]], list[dict[str, Any]]],
        ended: Callable[[Job, dict[str, Any]], None],
    ) -> None:
        self.read = read
        """The stored bodies of those of some jobs that have ended (blocking)."""
        self.ended = ended
        self.jobs: dict[str, Job] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    def discard(self, job: Job) -> None:
        self.jobs.pop(job.id, None)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        while self.jobs:
            await asyncio.sleep(POLL_S)
            ids = list(self.jobs)
            try:
                bodies = [
                    body
                    for i in range(0, len(ids), BATCH)
                    for body in await asyncio.to_thread(self.read, ids[i : i + BATCH])
                ]
            except Exception:  # the store is away for a moment: the callers wait on
                log.exception("reading the end of waited-on jobs failed")
                await asyncio.sleep(1.0)
                continue
            for body in bodies:
                job = self.jobs.pop(body["id"], None)
                if job is not None:
                    self.ended(job, body)


def job_of(body: dict[str, Any], workspace: str) -> Job:
    """A job another server runs, as a standby holds it while a caller waits: its stored
    body (from `job_rows.body_of`), without its input, which only its scheduler needs."""
    return Job(
        id=body["id"],
        app=body["app"],
        function=body["function"],
        unit="",
        input={},
        created_at=body["created_at"],
        created=time.monotonic() - max(0.0, time.time() - body["created_at"]),
        workspace=workspace,
        tags=body["tags"],
        attempts=body["attempts"],
    )
