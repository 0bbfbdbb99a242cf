"""Several servers on one store: which one schedules, and what the others do meanwhile.

On a store only one server uses (SQLite), that server schedules and this room does nothing. On
one several may share (PostgreSQL), one server at a time holds the scheduler lease (`lease`,
decided by `core.lease`) and runs workers, queues and scaling; the others stand by. A standby
accepts calls by writing their rows, with no owner, and the scheduler takes them in every
INTAKE_S; a caller waiting on a standby waits on the job here until its end is stored (`Watch`).
A standby takes the lease once it expires unrenewed, and with it every unfinished job; a
scheduler that finds its lease gone, or cannot renew it in time, stops (docs/architecture.md,
"Several servers").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from ember.control.lease import Lease, server_id, shared
from ember.control.records import Job
from ember.control.settings import Settings
from ember.control.standby import Watch, job_of
from ember.core.jobs import JobStatus
from ember.core.lease import Lead, renew_every, still_held

log = logging.getLogger("ember.control")

INTAKE_S = 0.02
"""How often the scheduler takes the jobs standbys wrote into the store."""
WATCHDOG_S = 0.1


@dataclass(frozen=True, slots=True)
class Roles:
    """What this room needs from outside (the plane fills it in)."""

    lead: Callable[[int | None], Awaitable[None]]
    """Start scheduling: under the lease's epoch, or as the store's one server (None)."""
    view: Callable[[], None]
    """A standby's view of apps, tokens, policies and secrets, read again (blocking)."""
    lost: Callable[[str], None]
    """This scheduler no longer holds the lease: stop scheduling at once."""
    take: Callable[[int], list[Any]]
    """Mark the queued jobs nobody (or an earlier scheduler) owns as the epoch's (blocking)."""
    requeue: Callable[[list[Any]], None]
    """Queue the jobs of those rows here."""
    ended: Callable[[list[str]], list[dict[str, Any]]]
    """The stored bodies of those jobs that have ended (blocking)."""
    ended_elsewhere: Callable[[Job, dict[str, Any]], None]
    store: Callable[[Job], asyncio.Future[None]]
    let_go: Callable[[Job], None]
    get: Callable[[str, str], Awaitable[Job | dict[str, Any]]]
    spawn: Callable[[Any], asyncio.Task[Any]]


class Cluster:
    def __init__(self, engine: Engine, settings: Settings, roles: Roles) -> None:
        self.lease: Lease | None = None
        """The scheduler lease, on a store several servers may share (None: one server)."""
        if shared(engine):
            me = server_id(settings.data_dir)
            self.lease = Lease(engine, me, settings.advertise_url, settings.lease_ttl_s)
        self.roles = roles
        self.leading = False
        self.leader: str | None = None
        """On a standby: the scheduler's address; None while nobody holds the lease."""
        self.watch = Watch(roles.ended, roles.ended_elsewhere)
        self._stopping = False
        self._reading = asyncio.Lock()
        self._read_at = -1.0

    def forward_to(self) -> str | bool | None:
        """For the API's forwarding: None while this server schedules, else the scheduler's
        address, or False while nobody holds the lease."""
        if self.leading:
            return None
        return self.leader or False

    async def start(self) -> None:
        if self.lease is None:
            await self._lead(None)
            return
        step = await asyncio.to_thread(self.lease.step)
        self.roles.spawn(self._lease_forever())  # renewing while the scheduler starts
        if isinstance(step, Lead):
            await self._lead(step.epoch)
        else:
            self.leader = step.address
            await self._view(time.monotonic())
            log.info("standing by: the server at %s schedules", step.address)

    def stop(self) -> None:
        self._stopping = True
        self.watch.close()

    async def _lead(self, epoch: int | None) -> None:
        """Start scheduling (templates may take a while: the lease is renewed meanwhile)."""
        self.leader = None
        if epoch is not None:
            self.roles.spawn(self._watchdog())
        await self.roles.lead(epoch)
        self.leading = True
        if epoch is not None:
            self.roles.spawn(self._intake_forever(epoch))

    # ----------------------------------------------------------------- the lease
    async def _lease_forever(self) -> None:
        """Renew the lease while scheduling; while standing by, take it once it expires."""
        assert self.lease is not None
        while not self._stopping:
            await asyncio.sleep(renew_every(self.lease.ttl))
            try:
                step = await asyncio.to_thread(self.lease.step)
                if isinstance(step, Lead):
                    if step.took:
                        log.warning("taking over scheduling (lease epoch %d)", step.epoch)
                        self.roles.spawn(self._take_over(step.epoch))
                elif step.lost:
                    self._lose("another server holds the scheduler lease now")
                else:
                    self.leader = step.address
                    await self._view(time.monotonic())
            except Exception:  # the watchdog stops a scheduler whose lease runs out meanwhile
                log.exception("a step of the scheduler lease failed; trying again")

    async def _take_over(self, epoch: int) -> None:
        try:
            await self._lead(epoch)
        except Exception:  # at start a failure stops the server; on a takeover, too
            log.exception("starting to schedule failed")
            self._lose("it could not start scheduling")

    async def _watchdog(self) -> None:
        """On the scheduler's own clock: stop before the lease can have expired in the store,
        however long a renewal takes."""
        lease = self.lease
        assert lease is not None
        while not self._stopping:
            await asyncio.sleep(WATCHDOG_S)
            if lease.epoch is not None and not still_held(
                lease.renewed_at, time.monotonic(), lease.ttl
            ):
                self._lose("its lease ran out before it could renew it")

    def _lose(self, why: str) -> None:
        if self._stopping:
            return
        self._stopping, self.leading = True, False
        self.roles.lost(why)

    async def _intake_forever(self, epoch: int) -> None:
        while not self._stopping:
            await asyncio.sleep(INTAKE_S)
            try:
                rows = await asyncio.to_thread(self.roles.take, epoch)
            except Exception:
                log.exception("taking the jobs other servers accepted failed; trying again")
                await asyncio.sleep(1.0)
                continue
            if rows and not self._stopping:
                self.roles.requeue(rows)

    async def _view(self, asked: float = 0.0) -> None:
        """Read the view again, unless a read that began after `asked` has ended meanwhile
        (one read at a time: callers that queue behind one share the next)."""
        async with self._reading:
            if self._read_at > asked:
                return
            began = time.monotonic()  # what it reads is as of its start
            await asyncio.to_thread(self.roles.view)
            self._read_at = began

    async def read_again(self) -> bool:
        """On a standby, a call for an app or function it does not know may be for one deployed
        through another server a moment ago: read the store again, in a read that begins after
        the call came, and say True. False on the scheduler: deploys go through it."""
        if self.leading:
            return False
        await self._view(time.monotonic())
        return True

    # ----------------------------------------------------------------- a standby's calls
    def accepted(self, job: Job) -> None:
        """A job a standby accepted: its row goes to the store (the scheduler takes it from
        there), and the job waits here for a caller that may wait on it."""
        self.roles.store(job)
        self.watch.add(job)

    def stored(self, job: Job, stored: asyncio.Future[None]) -> asyncio.Future[None]:
        """Once a standby's job is durable nobody here waits for it: it is let go."""
        if not self.leading:

            def let_go(_: asyncio.Future[None]) -> None:
                self.watch.discard(job)
                self.roles.let_go(job)

            stored.add_done_callback(let_go)
        return stored

    async def get(self, workspace: str, job_id: str) -> Job | dict[str, Any]:
        """A job, live or stored; on a standby one still running elsewhere is watched, so that
        a caller may wait here for its end."""
        job = None if self.leading else self.watch.jobs.get(job_id)
        if job is not None and job.workspace == workspace:
            return job
        found = await self.roles.get(workspace, job_id)
        if not isinstance(found, dict) or JobStatus(found["status"]).terminal:
            return found
        if not self.leading:
            job = job_of(found, workspace)
            self.watch.add(job)
            return job
        epoch = self.lease.epoch if self.lease else None
        if epoch is not None:  # a standby's job the intake has not taken yet: take it now
            rows = await asyncio.to_thread(self.roles.take, epoch)
            if rows:
                self.roles.requeue(rows)
                return await self.roles.get(workspace, job_id)
        return found
