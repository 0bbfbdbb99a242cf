"""The control plane: accepts jobs, keeps them durable, pushes them to workers, scales pools.

Everything here runs on the server's event loop; decisions (how many workers, how latency
splits into terms, whether to retry) are delegated to `ember.core`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import secrets
import socket
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, delete, func, insert, select, update

from ember.backends.local import Launch, LocalBackend
from ember.control.audit import AuditLog
from ember.control.logs import LogStore
from ember.control.manifest import DeployError, validate_manifest
from ember.control.meter import Meter, round_up_orphans
from ember.control.policies import PolicyBook, Spend, alert_payload, mark_alerted, post_webhook
from ember.control.records import AppState, FunctionMeta, Job, Pool, Worker
from ember.control.vault import Vault
from ember.core import autoscaler
from ember.core.autoscaler import PoolView, WorkerState
from ember.core.budgets import (
    Blocked,
    Policy,
    PolicyError,
    admit,
    alert_due,
    gpu_cap,
    period_bounds,
    policy_request,
)
from ember.core.jobs import (
    JobStatus,
    fail_queued_on_startup_failure,
    should_retry,
    startup_backoff,
)
from ember.core.metering import Phase, UsageRecord, group_key, job_cost, summarize
from ember.core.placement import Allocation, Gpu, Never, Placed, Wait, place
from ember.core.prewarm import worker_floor
from ember.core.pricing import DEFAULT_CPU, DEFAULT_MEMORY_GIB, PriceTable, Resources, rate
from ember.core.spec import FunctionSpec, GpuRequest
from ember.core.timings import job_timings
from ember.store import tables
from ember.store.writer import Writer, execute
from ember.worker import protocol

log = logging.getLogger("ember.control")

RECENT_JOBS = 4096
TICK_S = 0.25

_ids = random.Random(secrets.randbits(128))
"""Job ids: unique, not secrets (a job is reached only from its own workspace), and drawn without
a system call per job, which costs more than the rest of building its id."""

_FINISH_JOB = (
    update(tables.jobs)
    .where(tables.jobs.c.id == bindparam("job_id"))
    .values(
        {
            c: bindparam(c)
            for c in (
                *("status", "output", "error", "timings", "cost"),
                *("attempts", "version", "finished_at"),
            )
        }
    )
)
"""Built once: building an UPDATE per job cost the event loop more than writing it."""
_INSERT_JOB = insert(tables.jobs)


class NotFoundError(LookupError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class UnplaceableError(ValueError):
    """No GPU in the inventory could ever run this function (HTTP 422)."""


class ConflictError(Exception):
    """The request clashes with what exists (HTTP 409)."""


class PolicyDenied(PermissionError):
    """The caller's usage policy does not allow this call (HTTP 403)."""


class BudgetBlocked(Exception):
    """The caller's policy has spent its budget for the period (HTTP 402)."""

    def __init__(self, blocked: Blocked) -> None:
        super().__init__(blocked.message)
        self.blocked = blocked


@dataclass
class Settings:
    data_dir: Path
    cancel_grace_s: float = 2.0
    drain_grace_s: float = 10.0
    inventory: tuple[Gpu, ...] = ()
    prices: PriceTable = field(default_factory=PriceTable)
    checkpoint_s: float = 1.0
    """How often open usage segments are written: the most metering a kill -9 can lose."""
    templates: bool = True
    """Fork workers from a pre-initialised template per function version."""
    host: str = "127.0.0.1"
    tls: bool = False
    """Where the API listens and whether with TLS: facts for `ember doctor`."""


class ControlPlane:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.apps: dict[tuple[str, str], AppState] = {}
        """(workspace, app name) -> the app's current version."""
        self.jobs: dict[str, Job] = {}
        self.recent: OrderedDict[str, Job] = OrderedDict()
        self.workers: dict[str, Worker] = {}
        self.counts: dict[tuple[str, str, str], Counter[str]] = {}
        self.policies = PolicyBook()
        self.spend = Spend()
        self.audit = AuditLog(engine)
        self.vault = Vault.load(settings.data_dir)
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        """(workspace, name) -> the secret's values, decrypted once at load or set."""
        self.backend = LocalBackend(
            settings.data_dir / "logs" / "workers", templates=settings.templates
        )
        self.logs = LogStore(settings.data_dir / "logs")
        self.control_addr = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.writer = Writer(self.engine, self.loop)
        self.audit.writer = self.writer
        self.meter = Meter(
            self.writer,
            self.settings.prices,
            lambda r: self.spend.add((r.workspace, r.policy or ""), r.start, r.usd),
        )
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.control_addr = f"{host}:{port}"
        self._requeue_pending(await asyncio.to_thread(self._load))
        for app in self.apps.values():
            await self._prepare(app)
            for pool in app.all_pools():
                self._pump(pool)
                self._scale(pool)
        self._spawn(self._tick_forever())

    async def stop(self) -> None:
        """Stop every worker (exit hooks get `drain_grace_s`), then flush the store."""
        self._stopping = True
        workers = list(self.workers.values())
        for w in workers:
            self._drain(w, reason="server stopping")
        deadline = time.monotonic() + self.settings.drain_grace_s
        while self.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for w in list(self.workers.values()):
            self._kill(w, "server stopping")
        deadline = time.monotonic() + 5
        while self.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._server.close()
        await self.backend.close()
        self.checkpoint()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.to_thread(self.writer.close)
        self.logs.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _tick_forever(self) -> None:
        last_checkpoint = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            for app in list(self.apps.values()):
                for pool in app.all_pools():
                    self._scale(pool)
            self.logs.flush()
            if time.monotonic() - last_checkpoint >= self.settings.checkpoint_s:
                last_checkpoint = time.monotonic()
                self.checkpoint()
                self._check_budgets()

    def checkpoint(self) -> None:
        """Write every live worker's open usage segment up to now."""
        self.meter.checkpoint(list(self.workers.values()), time.time())

    async def flush(self) -> None:
        """Meter up to now and wait until everything queued is in the store."""
        self.checkpoint()
        await self.writer.submit(lambda conn: None)

    def _load(self) -> list[Any]:
        """Read deployed apps and job counts; return the jobs accepted but never finished.

        Workers of the previous run that never recorded their end (the server was killed) end
        where their metering does: at their last checkpoint (rounded up under per-second billing).
        """
        with self.engine.begin() as conn:
            round_up_orphans(conn, self.settings.prices.billing)
            conn.execute(
                update(tables.workers)
                .where(tables.workers.c.ended_at.is_(None))
                .values(ended_at=tables.workers.c.metered_until, stop_reason="server stopped")
            )
            self.policies.load(conn)
            self.spend.load(conn, time.time())
            for row in conn.execute(select(tables.secrets)).mappings():
                self.secrets[(row["workspace"], row["name"])] = self.vault.decrypt(
                    row["ciphertext"]
                )
            for row in conn.execute(select(tables.apps)).mappings():
                v = tables.versions.c
                ver = (
                    conn.execute(
                        select(tables.versions).where(
                            v.workspace == row["workspace"],
                            v.app == row["name"],
                            v.version == row["current_version"],
                        )
                    )
                    .mappings()
                    .one()
                )
                self.apps[(row["workspace"], row["name"])] = self._build_app(
                    row["workspace"],
                    row["name"],
                    json.loads(row["tags"]),
                    ver["version"],
                    ver["filename"],
                    ver["source"],
                    json.loads(ver["functions"]),
                    row["created_at"],
                    row["updated_at"],
                )
            j = tables.jobs.c
            counts = conn.execute(
                select(j.workspace, j.app, j.function, j.status, func.count()).group_by(
                    j.workspace, j.app, j.function, j.status
                )
            ).all()
            for ws, app, fn, status, n in counts:
                self.counts.setdefault((ws, app, fn), Counter())[status] += n
            return list(
                conn.execute(
                    select(tables.jobs)
                    .where(tables.jobs.c.status.in_([JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS]))
                    .order_by(tables.jobs.c.created_at)
                ).mappings()
            )

    def _requeue_pending(self, pending: list[Any]) -> None:
        """Put every job accepted before the last stop back in its queue (on the event loop)."""
        now_wall, now = time.time(), time.monotonic()
        requeued = 0
        for row in pending:
            job = Job(
                id=row["id"],
                app=row["app"],
                function=row["function"],
                unit="",
                input=json.loads(row["input"]),
                created_at=row["created_at"],
                created=now - max(0.0, now_wall - row["created_at"]),
                attempts=row["attempts"],
                workspace=row["workspace"],
                policy=row["policy"],
                token=row["token"],
                tags=json.loads(row["tags"]) if row["tags"] else {},
            )
            app_state = self.apps.get((job.workspace, job.app))
            meta = app_state.functions.get(job.function) if app_state else None
            self.jobs[job.id] = job
            if app_state is None or meta is None:
                self._finish(
                    job,
                    JobStatus.FAILED,
                    error=_error(
                        "FunctionNotFound", f"{job.app}/{job.function} is no longer deployed"
                    ),
                )
                continue
            job.unit, job.kind = meta.unit, meta.kind
            app_state.pool(meta.unit, job.policy).queue.append(job)
            requeued += 1
        if requeued:
            log.warning("requeued %d job(s) accepted before the last stop", requeued)

    # ----------------------------------------------------------------- apps
    def _build_app(
        self,
        workspace: str,
        name: str,
        tags: dict[str, str],
        version: int,
        filename: str,
        source: str,
        functions: list[dict[str, Any]],
        created_at: float,
        updated_at: float,
    ) -> AppState:
        bundle = self.settings.data_dir / "bundles" / workspace / name / f"v{version}" / filename
        if not bundle.exists() or bundle.read_text() != source:
            bundle.parent.mkdir(parents=True, exist_ok=True)
            bundle.write_text(source)
        metas: dict[str, FunctionMeta] = {}
        pools: dict[str, Pool] = {}
        for f in functions:
            spec = FunctionSpec.from_dict(f["spec"])
            metas[f["name"]] = FunctionMeta(f["name"], f["unit"], f["kind"], f["params"], spec)
            if f["unit"] not in pools:
                pools[f["unit"]] = Pool(
                    name,
                    version,
                    f["unit"],
                    spec,
                    bundle,
                    workspace=workspace,
                    env=self._secret_env(workspace, spec.secrets),
                )
        return AppState(
            name, tags, version, filename, metas, pools, created_at, updated_at, workspace
        )

    def _secret_env(self, workspace: str, names: tuple[str, ...]) -> dict[str, str]:
        """The environment a function's secrets give its workers; EMBER_SECRET_KEYS tells the
        worker which variables to redact from what it reports."""
        env: dict[str, str] = {}
        for name in names:
            env.update(self.secrets.get((workspace, name), {}))
        if env:
            env["EMBER_SECRET_KEYS"] = ",".join(sorted(env))
        return env

    async def deploy(self, workspace: str, manifest: Any) -> dict[str, Any]:
        m = validate_manifest(manifest)
        name, now = m["name"], time.time()
        for f in m["functions"]:
            for secret in f["spec"].get("secrets") or ():
                if (workspace, secret) not in self.secrets:
                    raise DeployError(
                        f"{f['name']}: no secret named {secret!r} in workspace {workspace!r}; "
                        f"create it first with `ember secret set {secret} KEY=VALUE`"
                    )
        old = self.apps.get((workspace, name))
        version = old.version + 1 if old else 1
        created_at = old.created_at if old else now
        app = self._build_app(
            workspace,
            name,
            m["tags"],
            version,
            m["filename"],
            m["source"],
            m["functions"],
            created_at,
            now,
        )

        def write(conn: Connection) -> None:
            values = {"tags": json.dumps(m["tags"]), "current_version": version, "updated_at": now}
            a = tables.apps.c
            if old is None:
                conn.execute(
                    insert(tables.apps).values(
                        workspace=workspace, name=name, created_at=now, **values
                    )
                )
            else:
                conn.execute(
                    update(tables.apps)
                    .where(a.workspace == workspace, a.name == name)
                    .values(**values)
                )
            conn.execute(
                insert(tables.versions).values(
                    workspace=workspace,
                    app=name,
                    version=version,
                    filename=m["filename"],
                    source=m["source"],
                    functions=json.dumps(m["functions"]),
                    created_at=now,
                )
            )

        await self.writer.submit(write)
        self.apps[(workspace, name)] = app
        await self._prepare(app)
        if old is not None:
            self._retire(old, app)
        for pool in app.all_pools():
            self._pump(pool)
            self._scale(pool)
        return {
            "app": name,
            "version": version,
            "functions": [f["name"] for f in m["functions"]],
            "warnings": self._unplaceable(app),
        }

    def _unplaceable(self, app: AppState) -> list[str]:
        """Units no GPU here could ever run: deployable (another server may have the GPU), but
        every call would fail, so the deploy says so."""
        warnings = []
        for unit, pool in app.pools.items():
            if pool.spec.gpu:
                fit = place(pool.spec.gpu, pool.spec.gpu_memory_mib, self.settings.inventory, ())
                if isinstance(fit, Never):
                    warnings.append(f"{unit}: {fit.reason}; calls to it will be refused (422)")
        return warnings

    async def _prepare(self, app: AppState) -> None:
        """Start a template per unit; until one is ready, workers start plainly."""
        for unit, pool in app.pools.items():
            try:
                await self.backend.prepare(pool.bundle, app.name, unit, pool.env)
            except OSError as exc:
                log.warning("no template for %s/%s: %s", app.name, unit, exc)

    def _retire(self, old: AppState, new: AppState) -> None:
        """A redeploy: queued jobs move to the new version, old workers drain."""
        for pool in old.all_pools():
            pool.active = False
            self.backend.retire(pool.bundle, pool.unit)
            if pool.unit in new.pools:  # call history carries over
                successor = new.pool(pool.unit, pool.policy)
                successor.hist, successor.last_call_end = pool.hist, pool.last_call_end
            while pool.queue:
                job = pool.queue.popleft()
                meta = new.functions.get(job.function)
                if meta is None:
                    self._finish(
                        job,
                        JobStatus.FAILED,
                        error=_error(
                            "FunctionNotFound",
                            f"{job.function} was removed by redeploy v{new.version}",
                        ),
                    )
                    continue
                job.unit, job.kind = meta.unit, meta.kind
                new.pool(meta.unit, job.policy).queue.append(job)
            for w in list(pool.workers.values()):
                self._drain(w, reason=f"redeployed as v{new.version}")

    def apps_of(self, workspace: str) -> list[AppState]:
        return sorted(
            (a for (ws, _), a in self.apps.items() if ws == workspace), key=lambda a: a.name
        )

    def lookup(
        self, workspace: str, app: str, fn: str | None = None
    ) -> tuple[AppState, FunctionMeta | None]:
        state = self.apps.get((workspace, app))
        if state is None:
            have = ", ".join(a.name for a in self.apps_of(workspace)) or (
                "none yet (deploy one with `ember deploy FILE`)"
            )
            raise NotFoundError("app_not_found", f"no app named {app!r}; deployed apps: {have}")
        if fn is None:
            return state, None
        meta = state.functions.get(fn)
        if meta is None:
            have = ", ".join(state.functions)
            raise NotFoundError(
                "function_not_found", f"app {app!r} has no function {fn!r} (it has: {have})"
            )
        return state, meta

    # ----------------------------------------------------------------- jobs
    def submit(
        self,
        workspace: str,
        app: str,
        fn: str,
        input: Any,
        *,
        policy: str | None = None,
        token: str | None = None,
    ) -> tuple[Job, asyncio.Future[None]]:
        """Accept a job; the returned future resolves once it is durable in the store.

        Under a usage policy, the budget is checked here, before the job exists: once a `block`
        policy has spent its budget, calls are refused and only jobs already admitted run on.
        """
        state, meta = self.lookup(workspace, app, fn)
        assert meta is not None
        meta.validate(input)
        spec = meta.spec
        rules = self._policy(workspace, policy)
        if rules is not None:
            blocked = admit(rules, self.spent(workspace, rules, time.time()), time.time())
            if blocked is not None:
                raise BudgetBlocked(blocked)
        request = self._gpu_request(spec, rules)
        if request:
            fit = place(request, spec.gpu_memory_mib, self.settings.inventory, ())
            if isinstance(fit, Never):
                raise UnplaceableError(fit.reason)
        job = Job(
            id=f"job-{_ids.getrandbits(96):024x}",
            app=app,
            function=fn,
            unit=meta.unit,
            input=input,
            created_at=time.time(),
            created=time.monotonic(),
            kind=meta.kind,
            workspace=workspace,
            policy=policy,
            token=token,
            tags=dict(rules.tags) if rules else {},
        )
        row = {
            "id": job.id,
            "app": app,
            "function": fn,
            "status": JobStatus.IN_QUEUE.value,
            "input": json.dumps(input),
            "attempts": 0,
            "created_at": job.created_at,
            "workspace": workspace,
            "policy": policy,
            "token": token,
            "tags": json.dumps(job.tags) if job.tags else None,
        }
        durable = self.writer.submit(execute(_INSERT_JOB, row))
        self.jobs[job.id] = job
        pool = state.pool(meta.unit, policy)
        if (
            pool.last_call_end is not None
            and not pool.queue
            and not any(w.active_jobs for w in pool.workers.values())
        ):
            pool.hist = pool.hist.record(max(0.0, job.created - pool.last_call_end))
        pool.queue.append(job)
        self._pump(pool)
        self._scale(pool)
        return job, durable

    def _policy(self, workspace: str, name: str | None) -> Policy | None:
        if name is None:
            return None
        rules = self.policies.policies.get((workspace, name))
        if rules is None:  # deleting a policy needs its tokens gone first; this is a race
            raise PolicyDenied(f"the token's policy {name!r} no longer exists")
        return rules

    def _gpu_request(self, spec: FunctionSpec, rules: Policy | None) -> tuple[GpuRequest, ...]:
        try:
            return policy_request(rules, spec.gpu)
        except PolicyError as exc:
            raise PolicyDenied(str(exc)) from None

    def spent(self, workspace: str, rules: Policy, now: float) -> float:
        """A policy's spend this period: its records, plus what its live workers have used
        since their last record (not yet cut)."""
        total = self.spend.in_period((workspace, rules.name), rules, now)
        for w in self.workers.values():
            pool = w.pool
            if pool.policy == rules.name and pool.workspace == workspace and w.seg_phase:
                total += rate(w.resources, self.settings.prices) * max(0.0, now - w.seg_start)
        return total

    async def get_job(self, workspace: str, job_id: str) -> Job | dict[str, Any]:
        job = self.jobs.get(job_id) or self.recent.get(job_id)
        if job is not None and job.workspace == workspace:
            return job
        row = None if job is not None else await asyncio.to_thread(self._load_job, job_id)
        if row is None or row.pop("workspace") != workspace:
            raise NotFoundError("job_not_found", f"no job with id {job_id!r}")
        return row

    def _load_job(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(tables.jobs).where(tables.jobs.c.id == job_id))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return {
            "id": row["id"],
            "app": row["app"],
            "function": row["function"],
            "status": row["status"],
            "output": json.loads(row["output"]) if row["output"] is not None else None,
            "error": json.loads(row["error"]) if row["error"] else None,
            "timings": json.loads(row["timings"]) if row["timings"] else None,
            "cost": json.loads(row["cost"]) if row["cost"] else None,
            "tags": json.loads(row["tags"]) if row["tags"] else {},
            "workspace": row["workspace"],
            "reason": None,
            "attempts": row["attempts"],
            "created_at": row["created_at"],
            "finished_at": row["finished_at"],
        }

    def cancel(self, job: Job) -> None:
        if job.status.terminal:
            return
        if job.status is JobStatus.IN_QUEUE:
            pool = self._pool_of(job)
            if pool is not None and job in pool.queue:
                pool.queue.remove(job)
            self._finish(job, JobStatus.CANCELLED, error=None)
            return
        w = job.worker
        self._finish(job, JobStatus.CANCELLED, error=None)
        if w is not None and w.writer is not None:
            w.writer.write(protocol.encode({"t": "cancel", "job": job.id}))
            # Code that cannot be interrupted (a C call, a sleep) gets its worker stopped.
            self.loop.call_later(
                self.settings.cancel_grace_s, self._kill_if_still_running, w, job.id
            )

    def _kill_if_still_running(self, w: Worker, job_id: str) -> None:
        if job_id in w.running and w.id in self.workers:
            self._kill(w, f"job {job_id} was cancelled and did not stop")

    def _pool_of(self, job: Job) -> Pool | None:
        if job.worker is not None:
            return job.worker.pool
        state = self.apps.get((job.workspace, job.app))
        return state.pool(job.unit, job.policy) if state and job.unit in state.pools else None

    def _finish(
        self,
        job: Job,
        status: JobStatus,
        *,
        output: Any = None,
        error: dict[str, Any] | None,
    ) -> None:
        if job.status.terminal:
            return
        job.status = status
        job.output = job.outputs if job.is_generator and status is JobStatus.COMPLETED else output
        job.error = error
        job.finished = time.monotonic()
        job.finished_at = time.time()
        if job.timer is not None:
            job.timer.cancel()
        job.timings = job_timings(
            created=job.created,
            dispatched=job.dispatched,
            finished=job.finished,
            exec_s=None if job.exec_ms is None else job.exec_ms / 1000.0,
            worker=job.worker_start,
        ).to_dict()
        job.cost = self._job_cost(job)
        if (pool := self._pool_of(job)) is not None:
            pool.last_call_end = job.finished
        job.reason = None
        self.counts.setdefault((job.workspace, job.app, job.function), Counter())[status.value] += 1
        job.done.set()
        job.notify()
        row = {
            "job_id": job.id,
            "status": status.value,
            "output": None if job.output is None else json.dumps(job.output),
            "error": None if error is None else json.dumps(error),
            "timings": json.dumps(job.timings),
            "cost": json.dumps(job.cost),
            "attempts": job.attempts,
            "version": job.worker.pool.version if job.worker else None,
            "finished_at": job.finished_at,
        }
        self.writer.submit(execute(_FINISH_JOB, row)).add_done_callback(
            lambda _f: self._forget(job)
        )

    def _job_cost(self, job: Job) -> dict[str, float]:
        w, t = job.worker, job.timings
        if w is None or t is None:
            return {"usd": 0.0, "gpu_seconds": 0.0, "cpu_seconds": 0.0}
        return job_cost(
            exec_ms=t["exec_ms"] + t["post_ms"],
            cold_start_ms=t["cold_start_ms"] + t["load_ms"],
            idle_before_ms=job.idle_before_ms,
            concurrency=w.pool.spec.scaling.concurrency,
            resources=w.resources,
            prices=self.settings.prices,
        ).to_dict()

    def _forget(self, job: Job) -> None:
        """Once the final state is stored, keep the job only in the bounded recent cache."""
        self.jobs.pop(job.id, None)
        self.recent[job.id] = job
        while len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)

    # ----------------------------------------------------------------- dispatch
    def _pump(self, pool: Pool) -> None:
        """Hand queued jobs to ready workers with a free slot, warmest first."""
        if not pool.active:
            return
        slots = pool.spec.scaling.concurrency
        while pool.queue:
            ready = [
                w
                for w in pool.workers.values()
                if w.state in (WorkerState.IDLE, WorkerState.BUSY) and len(w.running) < slots
            ]
            if not ready:
                return
            w = max(ready, key=lambda w: (w.state is WorkerState.BUSY, w.last_used))
            job = pool.queue.popleft()
            if job.status is not JobStatus.IN_QUEUE:
                continue
            self._dispatch(job, w)

    def _dispatch(self, job: Job, w: Worker) -> None:
        now = time.monotonic()
        job.status = JobStatus.IN_PROGRESS
        job.dispatched = now
        job.worker = w
        job.worker_start = w.start
        w.running[job.id] = job
        if w.state is WorkerState.IDLE and w.idle_since is not None and w.last_job_done:
            job.idle_before_ms = (now - w.idle_since) * 1000.0
        w.state = WorkerState.BUSY
        w.idle_since = None
        job.reason = None
        self.meter.switch(w, Phase.BUSY, time.time())
        w.last_used = now
        assert w.writer is not None
        w.writer.write(
            protocol.encode({"t": "run", "job": job.id, "fn": job.function, "input": job.input})
        )
        job.timer = self.loop.call_later(w.pool.spec.timeout, self._on_timeout, job, w)
        job.notify()

    def _on_timeout(self, job: Job, w: Worker) -> None:
        if job.status is not JobStatus.IN_PROGRESS or job.worker is not w:
            return
        limit = w.pool.spec.timeout
        # The loop's timer clock may run behind time.monotonic(): never end a job early.
        left = (job.dispatched or 0.0) + limit - time.monotonic()
        if left > 0:
            job.timer = self.loop.call_later(left, self._on_timeout, job, w)
            return
        self._finish(
            job,
            JobStatus.TIMED_OUT,
            error=_error(
                "TimeoutError", f"job ran past its timeout of {limit:g} s; its worker was stopped"
            ),
        )
        self._kill(w, f"job {job.id} timed out")

    def _release(self, w: Worker, job_id: str) -> None:
        w.running.pop(job_id, None)
        if not w.running and w.state is WorkerState.BUSY:
            w.state = WorkerState.IDLE
            w.idle_since = time.monotonic()
            w.last_job_done = True
            self.meter.switch(w, Phase.IDLE, time.time())
        if w.state is WorkerState.DRAINING:
            return
        self._pump(w.pool)
        self._scale(w.pool)

    # ----------------------------------------------------------------- scaling
    def _scale(self, pool: Pool) -> None:
        if self._stopping:
            return
        now = time.monotonic()
        if not pool.active:
            for w in list(pool.workers.values()):
                if w.state is not WorkerState.DRAINING:
                    self._drain(w, reason="old version")
            return
        running = sum(w.active_jobs for w in pool.workers.values())
        view = PoolView(len(pool.queue), running, tuple(w.view() for w in pool.workers.values()))
        scaling = pool.spec.scaling
        floor = None
        if scaling.prewarm or scaling.warm_schedule:
            floor = worker_floor(scaling, pool.hist, pool.last_call_end, now, datetime.now())
        rules = self.policies.policies.get((pool.workspace, pool.policy or ""))
        if rules is not None and not pool.queue and self._blocked(pool.workspace, rules):
            # Spent: what is idle stops now, so the money stops with the jobs already admitted.
            for w in list(pool.workers.values()):
                if w.state is WorkerState.IDLE:
                    self._drain(w, reason=f"policy {rules.name!r} reached its budget")
            return
        decision = autoscaler.decide(view, scaling, now, floor)
        pool.wait_reason = None
        for _ in range(decision.start):
            if now < pool.next_start:
                break
            fit: Placed | Wait | Never
            try:
                request = self._gpu_request(pool.spec, rules)
            except PolicyDenied as exc:  # the policy changed under queued jobs
                fit = Never(str(exc))
            else:
                fit = place(
                    request, pool.spec.gpu_memory_mib, self.settings.inventory, self._allocations()
                )
            if isinstance(fit, Placed) and rules is not None and fit.gpus:
                held = self._gpus_held(pool.workspace, rules.name)
                if (reason := gpu_cap(rules, held, len(fit.gpus))) is not None:
                    fit = Wait(reason)
            if isinstance(fit, Wait):
                pool.wait_reason = fit.reason
                break
            if isinstance(fit, Never):  # the inventory cannot change under a running server
                error = _error("NoFittingGpu", fit.reason)
                while pool.queue:
                    self._finish(pool.queue.popleft(), JobStatus.FAILED, error=error)
                break
            self._start_worker(pool, fit)
        for job in pool.queue:
            job.reason = pool.wait_reason
        for wid in decision.stop:
            self._drain(pool.workers[wid], reason="idle")

    def _blocked(self, workspace: str, rules: Policy) -> bool:
        if rules.action != "block" or rules.budget_usd is None:
            return False
        now = time.time()
        return admit(rules, self.spent(workspace, rules, now), now) is not None

    def _gpus_held(self, workspace: str, policy: str) -> int:
        return len(
            {
                i
                for w in self.workers.values()
                if w.pool.policy == policy and w.pool.workspace == workspace
                for i in w.gpus
            }
        )

    def _allocations(self) -> list[Allocation]:
        return [Allocation(w.id, w.gpus, w.gpu_memory_mib) for w in self.workers.values() if w.gpus]

    def _start_worker(self, pool: Pool, fit: Placed) -> None:
        spec = pool.spec
        gpu_count = float(len(fit.gpus))
        if fit.memory_mib is not None and fit.gpus:
            gpu_count = fit.memory_mib / self.settings.inventory[fit.gpus[0]].memory_mib
        w = Worker(
            id="w-" + secrets.token_hex(5),
            pool=pool,
            secret=secrets.token_hex(16),
            spawned=time.monotonic(),
            gpus=fit.gpus,
            gpu_memory_mib=fit.memory_mib,
            resources=Resources(
                gpu_type=fit.type,
                gpu_count=gpu_count,
                cpu=spec.cpu or DEFAULT_CPU,
                memory_gib=spec.memory_mib / 1024 if spec.memory_mib else DEFAULT_MEMORY_GIB,
            ),
        )
        pool.workers[w.id] = w
        self.workers[w.id] = w
        state = self.apps.get((pool.workspace, pool.app))
        rules = self.policies.policies.get((pool.workspace, pool.policy or ""))
        tags = {**(state.tags if state else {}), **spec.tags, **(rules.tags if rules else {})}
        self.meter.begin(w, time.time(), tags)
        self._spawn(self._run_worker(w))

    async def _run_worker(self, w: Worker) -> None:
        gpus = [self.settings.inventory[i] for i in w.gpus]
        launch = Launch(
            w.id,
            w.secret,
            self.control_addr,
            w.pool.bundle,
            w.pool.app,
            w.pool.unit,
            w.pool.spec.scaling.concurrency,
            tuple(gpus),
            w.gpu_memory_mib,
            w.pool.env,
        )
        try:
            w.process = await self.backend.start(launch)
        except Exception as exc:  # could not even start a process
            w.fatal = _error(type(exc).__name__, f"could not start a worker: {exc}")
            self._on_exit(w, -1)
            return
        w.pid = w.process.pid
        if w.stop_reason is not None:  # stopped while it was being started
            w.process.kill()
        # As in Modal, `timeout` also bounds a worker's start (imports and @enter hooks).
        self.loop.call_later(w.pool.spec.timeout, self._on_startup_timeout, w)
        code = await w.process.wait()
        self._on_exit(w, code)

    def _on_startup_timeout(self, w: Worker) -> None:
        if w.ready is not None or w.id not in self.workers or w.stop_reason is not None:
            return
        w.fatal = _error(
            "StartupTimeout",
            f"the worker did not become ready within the timeout of {w.pool.spec.timeout:g} s "
            "(imports or @enter hooks still running); it was stopped",
        )
        if w.process is not None:
            w.process.kill()

    def _drain(self, w: Worker, reason: str) -> None:
        if w.state is WorkerState.DRAINING:
            return
        was_ready = w.state is not WorkerState.STARTING
        w.state = WorkerState.DRAINING
        w.stop_reason = reason
        if not was_ready or w.writer is None:
            self._kill(w, reason)
            return
        w.writer.write(protocol.encode({"t": "drain"}))
        grace = self.settings.drain_grace_s + (w.pool.spec.timeout if w.running else 0.0)
        w.kill_timer = self.loop.call_later(
            grace, self._kill, w, f"{reason}; did not drain in time"
        )

    def _kill(self, w: Worker, reason: str) -> None:
        w.stop_reason = w.stop_reason or reason
        w.state = WorkerState.DRAINING
        if w.process is not None:
            w.process.kill()

    def _on_exit(self, w: Worker, code: int) -> None:
        if self.workers.pop(w.id, None) is None:
            return
        pool = w.pool
        pool.workers.pop(w.id, None)
        if w.kill_timer is not None:
            w.kill_timer.cancel()
        w.state = WorkerState.STOPPED
        self.meter.end(w, time.time(), code, w.stop_reason)
        started = w.ready is not None
        if not started and w.stop_reason is None:
            self._on_startup_failure(pool, w, code)
        elif started:
            pool.startup_failures = 0
        for job in list(w.running.values()):
            if job.status.terminal:
                continue
            if w.stop_reason is not None and not job.status.terminal:
                # The server stopped this worker for another job's sake: not this job's fault.
                self._requeue(job)
                continue
            job.attempts += 1
            if should_retry(job.attempts, pool.spec.retries):
                log.warning("job %s: worker exited with code %s, retrying", job.id, code)
                self._store_attempts(job)
                self._requeue(job)
            else:
                self._finish(
                    job,
                    JobStatus.FAILED,
                    error=_error(
                        "WorkerExited",
                        f"worker exited with code {code} while running the job"
                        + (f" (after {job.attempts} attempts)" if job.attempts > 1 else ""),
                    ),
                )
        w.running.clear()
        if not self._stopping:
            self._pump(pool)
            self._scale(pool)
            if w.gpus:  # its GPUs are free: pools waiting for one may start a worker now
                for app in list(self.apps.values()):
                    for other in app.all_pools():
                        if other.wait_reason is not None and other is not pool:
                            self._scale(other)

    def _store_attempts(self, job: Job) -> None:
        """A retry is remembered, so a server restart cannot grant a crashing job more tries."""
        stmt = update(tables.jobs).where(tables.jobs.c.id == job.id).values(attempts=job.attempts)
        self.writer.submit(execute(stmt))

    def _requeue(self, job: Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
        job.status, job.dispatched, job.worker, job.worker_start = (
            JobStatus.IN_QUEUE,
            None,
            None,
            None,
        )
        job.exec_ms = None
        state = self.apps.get((job.workspace, job.app))
        meta = state.functions.get(job.function) if state else None
        if state is None or meta is None:
            self._finish(
                job, JobStatus.FAILED, error=_error("FunctionNotFound", "no longer deployed")
            )
            return
        state.pool(meta.unit, job.policy).queue.appendleft(job)
        job.notify()

    def _on_startup_failure(self, pool: Pool, w: Worker, code: int) -> None:
        pool.startup_failures += 1
        pool.next_start = time.monotonic() + startup_backoff(pool.startup_failures)
        err = w.fatal or _error("WorkerExited", f"worker exited with code {code} while starting")
        log.warning(
            "worker %s of %s/%s failed to start: %s", w.id, pool.app, pool.unit, err["message"]
        )
        if fail_queued_on_startup_failure(pool.startup_failures, w.fatal is not None):
            error = {**err, "message": f"worker failed to start: {err['message']}"}
            while pool.queue:
                self._finish(pool.queue.popleft(), JobStatus.FAILED, error=error)

    # ----------------------------------------------------------------- worker connections
    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        hello = await protocol.read(reader)
        w = self.workers.get(hello.get("worker", "")) if hello else None
        if (
            hello is None
            or w is None
            or not secrets.compare_digest(hello.get("secret", ""), w.secret)
        ):
            writer.close()
            return
        w.writer = writer
        w.pid = hello.get("pid", w.pid)
        try:
            while (msg := await protocol.read(reader)) is not None:
                self._on_message(w, msg)
        finally:
            writer.close()
            # A worker without its connection is of no use; its exit code tells what happened.
            if w.id in self.workers and w.process is not None:
                w.process.kill()

    def _on_message(self, w: Worker, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "result":
            job = w.running.get(msg["job"])
            if job is None:
                return
            if not job.status.terminal:
                job.exec_ms = msg.get("exec_ms", 0.0)
                if msg.get("ok"):
                    self._finish(job, JobStatus.COMPLETED, output=msg.get("output"), error=None)
                elif msg.get("status") == "CANCELLED":
                    self._finish(job, JobStatus.CANCELLED, error=None)
                else:
                    self._on_job_error(job, msg["error"])
            self._release(w, job.id)
        elif t == "output":
            job = w.running.get(msg["job"])
            if job is not None and not job.status.terminal:
                job.outputs.append(msg["value"])
                job.notify()
        elif t == "log":
            for job_id, stream, line, ts in msg["lines"]:
                job = w.running.get(job_id) if job_id else None
                fn = job.function if job else w.pool.unit
                self.logs.append(
                    f"{w.pool.workspace}/{w.pool.app}",
                    fn,
                    {
                        "ts": ts,
                        "job": job_id,
                        "worker": w.id,
                        "function": fn,
                        "stream": stream,
                        "line": line,
                    },
                )
        elif t == "ready":
            w.ready = time.monotonic()
            w.load_ms = float(msg.get("load_ms", 0.0))
            if w.state is WorkerState.STARTING:
                w.state = WorkerState.IDLE
                w.idle_since = w.ready  # last_used stays 0: warmest means it ran a job
            self.meter.switch(w, Phase.IDLE, time.time())
            w.pool.startup_failures = 0
            self._pump(w.pool)
            self._scale(w.pool)
        elif t == "fatal":
            w.fatal = msg["error"]

    def _on_job_error(self, job: Job, error: dict[str, Any]) -> None:
        job.attempts += 1
        assert job.worker is not None
        if should_retry(job.attempts, job.worker.pool.spec.retries):
            self._store_attempts(job)
            self._requeue(job)
            return
        self._finish(job, JobStatus.FAILED, error=error)

    # ----------------------------------------------------------------- policies
    def _check_budgets(self) -> None:
        """At every checkpoint: a policy that reached its budget alerts once per period."""
        now = time.time()
        for key, rules in list(self.policies.policies.items()):
            if rules.budget_usd is None:
                continue
            spent = self.spent(key[0], rules, now)
            if not alert_due(rules, spent, now, self.policies.alerted.get(key)):
                continue
            start, _ = period_bounds(rules.period, now)
            self.policies.alerted[key] = start
            self.writer.submit(functools.partial(mark_alerted, key=key, period_start=start))
            payload = alert_payload(key, rules, spent, now)
            log.warning(
                "budget: policy %r of workspace %r spent $%.4f of its $%.2f %s budget (%s)",
                rules.name,
                key[0],
                spent,
                rules.budget_usd,
                rules.period,
                "new calls are refused" if rules.action == "block" else "alert only",
            )
            self.audit.record(
                workspace=key[0],
                actor="server",
                action="budget.reached",
                target=f"policy:{rules.name}",
                outcome="blocked" if rules.action == "block" else "alerted",
                detail={"spent_usd": round(spent, 6), "budget_usd": rules.budget_usd},
            )
            if rules.webhook:
                self._spawn(post_webhook(rules.webhook, payload))

    def policy_status(self, workspace: str, rules: Policy) -> dict[str, Any]:
        now = time.time()
        start, reset = period_bounds(rules.period, now)
        spent = self.spent(workspace, rules, now)
        return {
            **rules.to_dict(),
            "created_at": self.policies.created_at.get((workspace, rules.name)),
            "spent_usd": round(spent, 9),
            "period_start": start,
            "reset_at": reset,
            "blocked": rules.action == "block" and admit(rules, spent, now) is not None,
            "gpus_held": self._gpus_held(workspace, rules.name),
        }

    async def create_policy(self, workspace: str, rules: Policy) -> dict[str, Any]:
        key = (workspace, rules.name)
        if key in self.policies.policies:
            raise ConflictError(
                f"policy {rules.name!r} exists; delete it first (`ember policy delete "
                f"{rules.name}`) or pick another name"
            )
        now = time.time()
        await self.writer.submit(
            execute(
                insert(tables.policies),
                {
                    "workspace": workspace,
                    "name": rules.name,
                    "body": json.dumps(rules.to_dict()),
                    "created_at": now,
                },
            )
        )
        self.policies.policies[key] = rules
        self.policies.created_at[key] = now
        return self.policy_status(workspace, rules)

    async def delete_policy(self, workspace: str, name: str) -> None:
        key = (workspace, name)
        if key not in self.policies.policies:
            raise NotFoundError("policy_not_found", f"no policy named {name!r}")
        p = tables.policies.c
        await self.writer.submit(
            execute(delete(tables.policies).where(p.workspace == workspace, p.name == name))
        )
        del self.policies.policies[key]
        self.policies.alerted.pop(key, None)

    # ----------------------------------------------------------------- secrets
    def secret_names(self, workspace: str) -> list[str]:
        return sorted(name for ws, name in self.secrets if ws == workspace)

    def users_of_secret(self, workspace: str, name: str) -> list[str]:
        return sorted(
            f"{app.name}/{meta.name}"
            for app in self.apps_of(workspace)
            for meta in app.functions.values()
            if name in meta.spec.secrets
        )

    async def set_secret(self, workspace: str, name: str, values: dict[str, str]) -> float:
        """Store a secret encrypted; functions naming it get it in workers started from now on
        (their templates restart with it)."""
        now = time.time()
        key = (workspace, name)
        ciphertext = self.vault.encrypt(values)
        existed = key in self.secrets
        s_ = tables.secrets.c

        def write(conn: Connection) -> None:
            row = {"keys": json.dumps(sorted(values)), "ciphertext": ciphertext, "updated_at": now}
            if existed:
                conn.execute(
                    update(tables.secrets)
                    .where(s_.workspace == workspace, s_.name == name)
                    .values(**row)
                )
            else:
                conn.execute(
                    insert(tables.secrets).values(
                        workspace=workspace, name=name, created_at=now, **row
                    )
                )

        await self.writer.submit(write)
        self.secrets[key] = dict(values)
        for app in self.apps_of(workspace):
            touched = False
            for base in app.pools.values():
                if name not in base.spec.secrets:
                    continue
                touched = True
                env = self._secret_env(workspace, base.spec.secrets)
                for pool in app.all_pools():
                    if pool.unit == base.unit:
                        pool.env = env
                self.backend.retire(base.bundle, base.unit)
            if touched:
                await self._prepare(app)
        return now

    async def delete_secret(self, workspace: str, name: str) -> None:
        if (workspace, name) not in self.secrets:
            raise NotFoundError("secret_not_found", f"no secret named {name!r}")
        users = self.users_of_secret(workspace, name)
        if users:
            raise ConflictError(
                f"secret {name!r} is used by {', '.join(users)}; redeploy them without it first"
            )
        s_ = tables.secrets.c
        await self.writer.submit(
            execute(delete(tables.secrets).where(s_.workspace == workspace, s_.name == name))
        )
        del self.secrets[(workspace, name)]

    # ----------------------------------------------------------------- views
    def workers_of(self, workspace: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.pool.workspace == workspace]

    def nodes(self, workspace: str) -> list[dict[str, Any]]:
        """The GPU inventory of this machine, with what each GPU runs for this workspace (the
        workers of others count only as memory in use)."""
        held: dict[int, list[dict[str, Any]]] = {}
        used: Counter[int] = Counter()
        for w in self.workers.values():
            for i in w.gpus:
                used[i] += 1
        for w in self.workers_of(workspace):
            for i in w.gpus:
                held.setdefault(i, []).append(
                    {
                        "worker": w.id,
                        "app": w.pool.app,
                        "unit": w.pool.unit,
                        "state": w.state.value,
                        "memory_mib": w.gpu_memory_mib,
                        "jobs": list(w.running),
                    }
                )
        gpus = [
            {
                "index": g.index,
                "type": g.type,
                "memory_mib": g.memory_mib,
                "simulated": g.simulated,
                "uuid": g.uuid,
                "workers": held.get(g.index, []),
                "in_use": used[g.index] > 0,
            }
            for g in self.settings.inventory
        ]
        return [{"name": socket.gethostname(), "backend": self.backend.name, "gpus": gpus}]

    async def usage(
        self,
        workspace: str,
        group_by: list[str],
        since: float | None,
        until: float | None,
        granularity: str | None,
    ) -> list[dict[str, Any]]:
        """Usage totals per group, metered up to this instant (raises ValueError for bad groups)."""
        for g in group_by:
            group_key(g)
        await self.flush()

        def read() -> list[UsageRecord]:
            q = select(tables.usage).where(tables.usage.c.workspace == workspace)
            if since is not None:
                q = q.where(tables.usage.c.end > since)
            if until is not None:
                q = q.where(tables.usage.c.start < until)
            with self.engine.connect() as conn:
                return [_usage_record(r) for r in conn.execute(q).mappings()]

        records = await asyncio.to_thread(read)
        return summarize(records, group_by, granularity, self.settings.prices)

    def health(self, workspace: str, app: str, fn: str) -> dict[str, Any]:
        state, meta = self.lookup(workspace, app, fn)
        assert meta is not None
        counts = self.counts.get((workspace, app, fn), Counter())
        live = [
            j
            for j in self.jobs.values()
            if j.app == app and j.function == fn and j.workspace == workspace
        ]
        workers = Counter(
            w.state.value
            for p in state.all_pools()
            if p.unit == meta.unit
            for w in p.workers.values()
        )
        return {
            "jobs": {
                "in_queue": sum(1 for j in live if j.status is JobStatus.IN_QUEUE),
                "in_progress": sum(1 for j in live if j.status is JobStatus.IN_PROGRESS),
                "completed": counts["COMPLETED"],
                "failed": counts["FAILED"],
                "cancelled": counts["CANCELLED"],
                "timed_out": counts["TIMED_OUT"],
            },
            "workers": {
                "starting": workers["STARTING"],
                "idle": workers["IDLE"],
                "busy": workers["BUSY"],
                "draining": workers["DRAINING"],
            },
            "version": state.version,
        }


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


def _error(type_: str, message: str) -> dict[str, Any]:
    return {"type": type_, "message": message, "traceback": None}
