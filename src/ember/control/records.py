"""In-memory state of the control plane: jobs in flight, workers, pools, deployed functions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, validators

from ember.backends.base import Runtime
from ember.control.errors import InputError
from ember.core.autoscaler import WorkerState, WorkerView
from ember.core.budgets import pool_scaling
from ember.core.jobs import JobOptions, JobStatus
from ember.core.metering import Phase
from ember.core.prewarm import IdleHistogram
from ember.core.pricing import Resources
from ember.core.spec import FunctionSpec
from ember.core.timings import WorkerStart


class Done(asyncio.Event):
    """A job's end: an Event that also calls back, so that a call answered straight from the
    HTTP protocol (`api/invoke.py`) waits for its job without a task of its own."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, when the job ends (at once, if it has)."""
        if self.is_set():
            callback()
        else:
            self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def set(self) -> None:
        super().set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


InputValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, v: isinstance(v, int) and not isinstance(v, bool)
    ),
)
"""JSON Schema as Python sees a call: an `int` parameter takes 2, not 2.0 (which the standard
counts as an integer, and which would reach the function as a float)."""


@dataclass
class FunctionMeta:
    name: str
    unit: str
    kind: str
    params: dict[str, Any]
    spec: FunctionSpec
    validator: Any = field(init=False, repr=False)
    empty_ok: bool = field(init=False, repr=False)
    """The schema accepts `{}`: a call without arguments needs no schema pass (a warm path)."""

    def __post_init__(self) -> None:
        self.validator = InputValidator(self.params.get("schema") or {})
        self.empty_ok = self.validator.is_valid({})

    def validate(self, input: Any) -> None:
        if not isinstance(input, dict):
            raise InputError(
                f"input must be a JSON object of keyword arguments, got {type(input).__name__}"
            )
        names = self.params.get("names", [])
        if not self.params.get("var_kwargs"):
            unknown = [k for k in input if k not in names]
            if unknown:
                takes = ", ".join(names) or "no arguments"
                raise InputError(f"unexpected argument '{unknown[0]}': {self.name} takes {takes}")
        missing = [k for k in self.params.get("required", []) if k not in input]
        if missing:
            raise InputError(f"missing required argument '{missing[0]}' of {self.name}")
        if not input and self.empty_ok:
            return
        error = next(
            iter(sorted(self.validator.iter_errors(input), key=lambda e: list(e.path))), None
        )
        if error is not None:
            path = list(error.absolute_path)
            where = str(path[0]) + "".join(f"[{p!r}]" for p in path[1:]) if path else "input"
            message = error.message if len(error.message) <= 300 else error.message[:297] + "..."
            raise InputError(f"argument '{where}': {message}")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "kind": self.kind,
            "params": self.params,
            "spec": self.spec.to_dict(),
        }


@dataclass(eq=False)
class Job:
    id: str
    app: str
    function: str
    unit: str
    input: dict[str, Any]
    created_at: float
    """Wall clock (epoch seconds), for people and the store."""
    created: float
    """Monotonic clock, for the latency terms."""
    kind: str = "function"
    input_json: str = ""
    """`input` as JSON, encoded once at intake: for its row and its worker alike."""
    workspace: str = "default"
    policy: str | None = None
    """The usage policy of the token that submitted it: its pool, tags and budget."""
    token: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    """The tags its usage carries: the app's, the function's and the policy's, as metered."""
    idempotency_key: str | None = None
    """The `Idempotency-Key` it was submitted with, unique in its workspace."""
    request_digest: str | None = None
    """What a repeat under that key must match: its function and input (`core.idempotency.digest`)."""
    status: JobStatus = JobStatus.IN_QUEUE
    output: Any = None
    outputs: list[Any] = field(default_factory=list)
    progress: Any = None
    """What its code last reported with RunPod's `progress_update` (cleared when requeued);
    not in `body()`: the `/runpod/v2` status shows it as a running job's `output`."""
    error: dict[str, Any] | None = None
    attempts: int = 0
    version: int | None = None
    dispatched: float | None = None
    finished: float | None = None
    finished_at: float | None = None
    exec_ms: float | None = None
    """As the worker measured it; None until it reports."""
    worker: Worker | None = None
    worker_start: WorkerStart | None = None
    timings: dict[str, float] | None = None
    cost: dict[str, float] | None = None
    idle_before_ms: float = 0.0
    """Idle time of its worker just before this job: part of the job's cost."""
    reason: str | None = None
    """Why a queued job is still waiting (no GPU free), for people reading its status."""
    timer: asyncio.TimerHandle | None = None
    """Its ttl while it is queued (a job with one), its timeout while it runs."""
    stored: asyncio.Future[None] | None = None
    """Its row's INSERT, once queued (`JobBook.store`); None while it lives in memory alone."""
    owner: int | None = None
    """The scheduler lease's epoch its row was written under (None: the one server's, or no
    scheduler's yet: a standby's, which the scheduler's intake takes; control/cluster.py)."""
    options: JobOptions | None = None
    """What its caller asked beyond its input (webhook, ttl, timeout, retention); None for a
    plain job, the warm path's."""
    done: Done = field(default_factory=lambda: Done())
    _changed: asyncio.Event | None = field(default=None, repr=False)

    @property
    def is_generator(self) -> bool:
        return self.kind in ("generator", "async_generator")

    @property
    def changed(self) -> asyncio.Event:
        """Set at the job's next change: a stream reader takes it, reads the job, waits on it."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def notify(self) -> None:
        """Wake every stream reader; each then takes a fresh event (made only when asked for:
        most jobs have no reader)."""
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app": self.app,
            "function": self.function,
            "status": self.status.value,
            "output": self.output,
            "error": self.error,
            "timings": self.timings,
            "cost": self.cost,
            "tags": self.tags,
            "reason": self.reason,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


@dataclass(eq=False)
class Worker:
    id: str
    pool: Pool
    secret: str
    spawned: float
    state: WorkerState = WorkerState.STARTING
    pid: int | None = None
    process: Any = None
    writer: asyncio.StreamWriter | None = None
    outbox: list[bytes] = field(default_factory=list, repr=False)
    """Frames waiting for the end of this turn of the loop (`send`)."""
    ready: float | None = None
    load_ms: float = 0.0
    running: dict[str, Job] = field(default_factory=dict)
    idle_since: float | None = None
    last_used: float = 0.0
    stop_reason: str | None = None
    """Set when the server itself stops the worker (timeout, cancel, drain, shutdown)."""
    fatal: dict[str, Any] | None = None
    kill_timer: asyncio.TimerHandle | None = None
    gpus: tuple[int, ...] = ()
    gpu_memory_mib: int | None = None
    resources: Resources = field(default_factory=Resources)
    # metering: the open usage segment (wall clock)
    tags: dict[str, str] = field(default_factory=dict)
    tags_json: str = "{}"
    """`tags` as stored with each usage record, encoded once."""
    started_at: float = 0.0
    seg_start: float = 0.0
    seg_phase: Phase | None = None
    metered_until: float = 0.0
    first_record: bool = False
    billed_ms: float = 0.0
    """What this worker's usage records have billed so far."""
    last_job_done: bool = False

    def send(self, frame: bytes) -> None:
        """Queue a frame for the worker; the frames of one turn of the event loop go out in one
        write (under load, one wake-up of the worker for many jobs, not one each)."""
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outbox.append(frame)

    def _flush(self) -> None:
        frames, self.outbox = self.outbox, []
        if self.writer is not None and frames:
            self.writer.write(frames[0] if len(frames) == 1 else b"".join(frames))

    @property
    def start(self) -> WorkerStart | None:
        if self.ready is None:
            return None
        return WorkerStart(self.spawned, self.ready - self.load_ms / 1000.0, self.ready)

    @property
    def active_jobs(self) -> int:
        return sum(1 for j in self.running.values() if not j.status.terminal)

    def has_active_jobs(self) -> bool:
        return any(not j.status.terminal for j in self.running.values())

    def view(self) -> WorkerView:
        return WorkerView(self.id, self.state, self.idle_since, self.last_used)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app": self.pool.app,
            "unit": self.pool.unit,
            "policy": self.pool.policy,
            "version": self.pool.version,
            "state": self.state.value,
            "pid": self.pid,
            "gpus": list(self.gpus),
            "gpu_type": self.resources.gpu_type,
            "jobs": list(self.running),
            "age_s": round(time.monotonic() - self.spawned, 3),
        }


@dataclass(eq=False)
class Pool:
    """The workers of one unit (a function, or a class and its methods) of one app version.

    Calls made under a usage policy run in a pool of their own (`policy` set), so that the
    policy's tags, GPU limits and budget apply to whole workers.
    """

    app: str
    version: int
    unit: str
    spec: FunctionSpec
    bundle: Path
    workspace: str = "default"
    policy: str | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """Secret values for the workers' environment; never logged or returned."""
    runtime: Runtime | None = None
    """The built Env its workers run in; None is the server's own Python."""
    root: Path | None = None
    """Its bundle's root directory; None: the bundle file's own directory."""
    active: bool = True
    queue: deque[Job] = field(default_factory=deque)
    workers: dict[str, Worker] = field(default_factory=dict)
    startup_failures: int = 0
    next_start: float = 0.0
    wait_reason: str | None = None
    hist: IdleHistogram = field(default_factory=IdleHistogram)
    """Idle times between calls, for `prewarm="auto"`."""
    last_call_end: float | None = None
    scale_due: bool = False
    """A plan for this pool is already due in this turn of the loop (`ControlPlane._scale_soon`)."""


@dataclass(eq=False)
class AppState:
    name: str
    tags: dict[str, str]
    version: int
    filename: str
    functions: dict[str, FunctionMeta]
    pools: dict[str, Pool]
    """The pool of each unit for calls under no policy."""
    created_at: float
    updated_at: float
    workspace: str = "default"
    policy_pools: dict[tuple[str, str], Pool] = field(default_factory=dict)
    """(unit, policy) -> the pool of that unit's calls under that policy, made on first use."""
    bundle: str | None = None
    """The digest of its code bundle; None for a version deployed as one file."""
    module: str | None = None

    def pool(self, unit: str, policy: str | None) -> Pool:
        base = self.pools[unit]
        if policy is None:
            return base
        pool = self.policy_pools.get((unit, policy))
        if pool is None:
            pool = self.policy_pools[(unit, policy)] = policy_pool(base, policy)
        return pool

    def all_pools(self) -> list[Pool]:
        return [*self.pools.values(), *self.policy_pools.values()]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tags": self.tags,
            "version": self.version,
            "filename": self.filename,
            "functions": [f.describe() for f in self.functions.values()],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "bundle": self.bundle,
            "module": self.module,
            "envs": {unit: pool.spec.env for unit, pool in self.pools.items() if pool.spec.env},
        }


def policy_pool(base: Pool, policy: str) -> Pool:
    """A unit's pool for one policy's calls (its scaling: `core.budgets.pool_scaling`)."""
    return Pool(
        base.app,
        base.version,
        base.unit,
        replace(base.spec, scaling=pool_scaling(base.spec.scaling)),
        base.bundle,
        workspace=base.workspace,
        policy=policy,
        env=base.env,
        runtime=base.runtime,
        root=base.root,
        active=base.active,
    )
