"""The control plane: builds the rooms, wires their events, and runs the server's loop.

Each room owns one kind of state (see docs/architecture.md):

- `deployments.Deployments`: apps, versions, functions, pools;
- `jobs.JobBook`: job intake and state, recovery at start;
- `dispatch.Dispatcher`: queues, handing jobs to workers, timeouts, results, cancels, retries;
- `scaling.Scaler`: how many workers each pool needs and on which GPUs (the core decides);
- `workers.Workers`: the worker lifecycle and the control channel, over a `Backend`;
- `governance.Governance`: usage policies, spend and budgets; `secrets.SecretBook`: secrets;
- `tokens.TokenBook`: workspaces and tokens; `meter.Meter`: usage records; `audit`, `logs`;
- `cluster.Cluster`: on a store several servers share, which one schedules;
- `series.Series`: the last hour of calls and workers, for charts.

Rooms never import each other: each says what it needs from outside as a small dataclass of
callables (`dispatch.Outside`, `scaling.Facts`, `workers.Events`), and this module, the only one
that knows them all, fills those in. Everything here runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from ember.backends.base import Backend
from ember.backends.sandbox import make_sandbox
from ember.config import TOKEN_FILE
from ember.control import job_rows, rollout, views
from ember.control.audit import AuditLog
from ember.control.backend_choice import make_backend
from ember.control.cluster import Cluster, Roles
from ember.control.deployments import Deployments
from ember.control.dispatch import Dispatcher, Outside
from ember.control.environments import Environments
from ember.control.governance import Governance
from ember.control.job_ops import JobOps
from ember.control.jobs import JobBook
from ember.control.logs import LogStore
from ember.control.meter import Meter, end_orphans
from ember.control.records import AppState, FunctionMeta, Pool, Worker
from ember.control.rollups import summarize_usage
from ember.control.scaling import Facts, Scaler
from ember.control.secrets import SecretBook
from ember.control.series import Series
from ember.control.settings import Settings
from ember.control.tokens import TokenBook
from ember.control.vault import Vault
from ember.control.webhooks import Webhooks
from ember.control.workers import Events, Workers
from ember.core.jobs import JobStatus
from ember.core.metering import Phase, check_query
from ember.core.placement import Placed
from ember.store.writer import Writer

log = logging.getLogger("ember.control")

TICK_S = 0.25


class ControlPlane(JobOps):
    """The server's state and loop; its job calls (submit, retry, purge, ...) are `JobOps`'s."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.audit = AuditLog(engine)
        self.tokens = TokenBook(engine, settings.data_dir / TOKEN_FILE)
        self.secrets = SecretBook(engine, Vault.load(settings.data_dir))
        self.logs = LogStore(settings.data_dir / "logs", settings.quotas)
        self.run_dir = Path(tempfile.mkdtemp(prefix="ember-run-"))
        """The control socket's directory: short (a socket path has a length limit) and private."""
        self.run_dir.chmod(0o711)
        self.control_socket = self.run_dir / "control.sock"
        self.sandbox, self.unsandboxed_why = make_sandbox(
            settings.sandbox, settings.data_dir, self.control_socket
        )
        self.backend: Backend = make_backend(settings, self.control_socket, self.sandbox)
        self.environments = Environments(settings.data_dir / "envs")
        self.deployments = Deployments(
            settings.data_dir,
            self.secrets.env_for,
            self.environments.runtime,
            settings.bundle_limit,
        )
        self.series = Series()
        self.jobs = JobBook(engine, settings.prices, self._job_ended, settings.quotas)
        self.webhooks = Webhooks(backoff_s=settings.webhook_backoff_s)
        self.cluster = Cluster(
            engine,
            settings,
            Roles(
                lead=self._lead,
                view=self._view,
                lost=self._lost,
                take=functools.partial(job_rows.take_queued, engine),
                requeue=self._take_in,
                ended=functools.partial(job_rows.ended, engine),
                ended_elsewhere=self.jobs.ended_elsewhere,
                store=self.jobs.store,
                let_go=self.jobs.let_go,
                get=self.jobs.get,
                spawn=self._spawn,
            ),
        )
        self.workers = Workers(
            self.backend,
            Events(self._worker_ready, self._worker_message, self._worker_exited),
            settings.drain_grace_s,
            self._spawn,
        )
        self.governance = Governance(
            settings.prices, self.workers.live, self.audit.record, self._spawn
        )
        self.dispatch = Dispatcher(
            Outside(
                finish=self.jobs.finish,
                store_attempts=self.jobs.store_attempts,
                kill=self.workers.kill,
                phase=self._phase,
                settled=self._scale_soon,
                home_of=self.deployments.home_of,
                track=self.jobs.track,
            ),
            settings.cancel_grace_s,
        )
        self.scaler = Scaler(
            Facts(
                rules_of=self.governance.rules_of,
                blocked=self.governance.blocked,
                gpu_request=self.governance.gpu_request,
                live=self.workers.live,
                gpus_held=self.governance.gpus_held,
            ),
            lambda: self.backend.inventory,  # live: a cluster's nodes come and go
        )

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.writer = Writer(self.engine, asyncio.get_running_loop())
        self.audit.writer = self.writer
        rooms = (self.tokens, self.secrets, self.environments, self.deployments, self.jobs)
        for room in (*rooms, self.governance):
            room.writer = self.writer
        self.meter = Meter(self.writer, self.settings.prices, self.governance.record_spend)
        await self.cluster.start()

    async def _lead(self, epoch: int | None) -> None:
        """Schedule: take every unfinished job (under the lease's `epoch`, when several servers
        share the store), start the templates and the loops. Jobs accepted meanwhile are
        stored unowned, as on a standby, and taken in by the cluster's intake."""
        await self.workers.listen(self.control_socket)
        await self.environments.build_missing(self.engine)  # Envs built by another server
        self._requeue_pending(await asyncio.to_thread(self._load, epoch))
        for app in list(self.deployments.apps.values()):
            await rollout.prepare(self.backend, app, self.logs.template_lines)
            for pool in app.all_pools():
                self._settle(pool)
        self._spawn(self._tick_forever())
        self._spawn(self.jobs.prune_forever())
        self.jobs.owner = epoch  # no await from here until the cluster says it leads

    def _lost(self, why: str) -> None:
        """No longer the scheduler: kill the workers at once (no job runs here and on the next
        scheduler too), then stop the server."""
        log.error("stopping: this server no longer schedules (%s)", why)
        self._stopping = True
        for w in list(self.workers.live()):
            self.workers.kill(w, "its server lost the scheduler lease")
        signal.raise_signal(signal.SIGTERM)

    def _view(self) -> None:
        """A standby's view of what callers may call, as stored (blocking, at every lease step)."""
        with self.engine.connect() as conn:
            self.governance.load(conn, time.time())
            self.secrets.load(conn)
            self.deployments.load(conn, runs_here=False)
            self.tokens.load(conn)
        self.jobs.elsewhere = job_rows.queued_elsewhere(self.engine)

    def _take_in(self, rows: list[Any]) -> None:  # jobs standbys accepted, taken from the store
        for job in self.jobs.recover(rows):
            if (pool := self._home(job)) is not None:
                self._enqueue(pool, job)

    async def stop(self) -> None:
        """Stop every worker (exit hooks get `drain_grace_s`), then flush the store."""
        self._stopping = True
        self.cluster.stop()
        await self.workers.stop_all(self.settings.drain_grace_s)
        await self.environments.close()
        await self.backend.close()
        await self.webhooks.close()
        self.checkpoint()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.to_thread(self.writer.close)
        if self.cluster.lease is not None:  # after the last rows: the next scheduler reads them
            await asyncio.to_thread(self.cluster.lease.release)
        self.logs.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _tick_forever(self) -> None:
        last_checkpoint = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            for pool in self.deployments.pools():
                self._scale(pool)
            self.backend.sweep(self.settings.template_idle_s, self.settings.template_memory)
            self.logs.flush()
            self.series.sample(self.workers.live(), time.time())
            if time.monotonic() - last_checkpoint >= self.settings.checkpoint_s:
                last_checkpoint = time.monotonic()
                self.checkpoint()
                self.governance.check_budgets()

    def checkpoint(self) -> None:
        """Write every live worker's open usage segment up to now, and the audit's counts."""
        now = time.time()
        self.meter.checkpoint(list(self.workers.live()), now)
        self.audit.checkpoint(now)

    async def flush(self) -> None:
        """Meter up to now and wait until everything queued is in the store."""
        self.checkpoint()
        await self.writer.submit(lambda conn: None)

    def _load(self, epoch: int | None) -> list[Any]:
        """Read the store's state (in a thread); return the jobs accepted but never finished
        (taken under `epoch`: see `_lead`)."""
        with self.engine.begin() as conn:
            end_orphans(conn, self.settings.prices.billing)
            self.tokens.load(conn)
            self.governance.load(conn, time.time())
            self.secrets.load(conn)
            self.environments.load(conn)
            self.deployments.load(conn)
            return self.jobs.load(conn, epoch)

    def _requeue_pending(self, pending: list[Any]) -> None:
        """Put every job accepted before the last stop back in its queue (on the event loop)."""
        requeued = 0
        for job in self.jobs.recover(pending):
            if (pool := self._home(job)) is not None:
                self.dispatch.restore(pool, job)
                requeued += 1
        if requeued:
            log.warning("requeued %d job(s) accepted before the last stop", requeued)

    # ----------------------------------------------------------------- deployments
    async def deploy(self, workspace: str, manifest: Any) -> dict[str, Any]:
        app, old = await self.deployments.deploy(workspace, manifest, self.secrets.has, self._ready)
        if old is not None:
            self._retire(old, app)
        for pool in app.all_pools():
            self._settle(pool)
        warnings = [
            *self.deployments.unplaceable(app, self.backend.inventory),
            *views.unsandboxed(app, self.sandbox is not None, self.unsandboxed_why, self.settings),
        ]
        return views.deployed(app, warnings)

    async def _ready(self, app: AppState, wait: bool) -> None:
        await rollout.prepare(self.backend, app, self.logs.template_lines)
        if wait:
            await rollout.check_imports(self.backend, app)

    def _retire(self, old: AppState, new: AppState) -> None:
        """A redeploy: queued jobs move to the new version, old workers drain."""
        retired = self.deployments.retire(old, new)
        for pool in retired.pools:
            self.backend.retire(pool.bundle, pool.unit)
        for job, error in retired.orphans:
            self.jobs.finish(job, JobStatus.FAILED, error=error)
        for pool in retired.pools:
            for w in list(pool.workers.values()):
                self.workers.drain(w, reason=f"redeployed as v{new.version}")

    def apps_of(self, workspace: str) -> list[AppState]:
        return self.deployments.apps_of(workspace)

    def lookup(
        self, workspace: str, app: str, fn: str | None = None
    ) -> tuple[AppState, FunctionMeta | None]:
        return self.deployments.lookup(workspace, app, fn)

    # ----------------------------------------------------------------- scaling
    def _settle(self, pool: Pool) -> None:
        """The pool's queue or workers changed: hand out what can run, then scale."""
        self.dispatch.pump(pool)
        self._scale(pool)

    def _scale_soon(self, pool: Pool) -> None:
        """Scale the pool after what this turn of the loop does: the job's frame to its worker
        goes out first, and the calls and results of one turn make one plan, not one each."""
        if pool.scale_due:
            return
        pool.scale_due = True
        asyncio.get_running_loop().call_soon(self._scale, pool)

    def _scale(self, pool: Pool) -> None:
        pool.scale_due = False
        if self._stopping:
            return
        plan = self.scaler.plan(pool)
        for fit in plan.start:
            self._start_worker(pool, fit)
        if plan.fail is not None:
            self.dispatch.fail_queue(pool, plan.fail)
        for w, reason in plan.drain:
            self.workers.drain(w, reason=reason)

    def _start_worker(self, pool: Pool, fit: Placed) -> None:
        w = self.workers.start(pool, fit)
        rules = self.governance.rules_of(pool)
        tags = {
            **self.deployments.tags_of(pool),
            **pool.spec.tags,
            **(rules.tags if rules else {}),
        }
        self.meter.begin(w, time.time(), tags)

    def _phase(self, w: Worker, phase: Phase) -> None:
        self.meter.switch(w, phase, time.time())

    # ----------------------------------------------------------------- worker events
    def _worker_ready(self, w: Worker) -> None:
        self.meter.switch(w, Phase.IDLE, time.time())
        self.scaler.started(w.pool)
        self._settle(w.pool)

    def _worker_message(self, w: Worker, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "result":
            self.dispatch.on_result(w, msg)
        elif t == "output":
            self.dispatch.on_output(w, msg)
        elif t == "progress":
            self.dispatch.on_progress(w, msg)
        elif t == "refresh":  # a RunPod handler's `refresh_worker`: no new job for this worker
            self.workers.drain(w, reason="its RunPod handler asked for refresh_worker")
        elif t == "log":
            self.logs.worker_lines(w, msg["lines"])

    def _worker_exited(self, w: Worker, code: int) -> None:
        pool = w.pool
        self.meter.end(w, time.time(), code, w.stop_reason)
        if w.ready is None and w.stop_reason is None:
            error = self.scaler.failed_to_start(pool, w, code)
            if error is not None:
                self.dispatch.fail_queue(pool, error)
        elif w.ready is not None:
            self.scaler.started(pool)
        self.dispatch.worker_gone(w, code)
        if self._stopping:
            return
        self._settle(pool)
        if w.gpus:  # its GPUs are free: pools waiting for one may start a worker now
            for other in self.deployments.pools():
                if other.wait_reason is not None and other is not pool:
                    self._scale(other)

    # ----------------------------------------------------------------- secrets
    async def set_secret(self, workspace: str, name: str, values: dict[str, str]) -> float:
        """Store a secret encrypted; functions naming it get it in workers started from now on
        (their templates restart with it)."""
        now = await self.secrets.set(workspace, name, values)
        for app in self.deployments.apps_of(workspace):
            env_for = functools.partial(self.secrets.env_for, workspace)
            await rollout.secret_changed(self.backend, app, name, env_for, self.logs.template_lines)
        return now

    async def delete_secret(self, workspace: str, name: str) -> None:
        await self.secrets.delete(
            workspace, name, self.deployments.users_of_secret(workspace, name)
        )

    # ----------------------------------------------------------------- views
    def workers_of(self, workspace: str) -> list[Worker]:
        return self.workers.of(workspace)

    def nodes(self, workspace: str) -> list[dict[str, Any]]:
        return views.nodes(
            self.backend.node,
            self.backend.name,
            self.backend.inventory,
            self.workers.live(),
            self.workers.of(workspace),
        )

    async def usage(
        self,
        workspace: str,
        group_by: list[str],
        since: float | None,
        until: float | None,
        granularity: str | None,
        *,
        fresh: bool = True,
    ) -> list[dict[str, Any]]:
        """Usage totals per group, metered up to this instant (raises ValueError for bad groups).
        Rollups and edge records, summed in a thread: the loop serves other requests meanwhile.
        `fresh=False`: as stored, up to the last checkpoint (a second ago), without waiting for
        the writer's queue, which under load holds seconds of job rows (a scrape need not)."""
        check_query(group_by, granularity)
        if fresh:
            await self.flush()
        query = (workspace, group_by, since, until, granularity, self.settings.prices)
        return await asyncio.to_thread(summarize_usage, self.engine, *query)
