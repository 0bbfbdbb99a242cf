"""What the API shows of live state that no one room owns: nodes and their GPUs, a function's
health. Plain functions over the records the rooms hand over; they change nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from ember.control.records import AppState, Job, Worker
from ember.control.settings import Settings
from ember.core.isolation import refusal
from ember.core.jobs import JobStatus
from ember.core.placement import Gpu


def nodes(
    node: str,
    backend: str,
    inventory: tuple[Gpu, ...],
    live: Iterable[Worker],
    mine: Iterable[Worker],
) -> list[dict[str, Any]]:
    """The GPU inventory, one entry per node (this machine, or each node of a Ray cluster that
    has GPUs), with what each GPU runs for this workspace (`mine`); the workers of others count
    only as memory in use."""
    held: dict[int, list[dict[str, Any]]] = {}
    used: Counter[int] = Counter()
    for w in live:
        for i in w.gpus:
            used[i] += 1
    for w in mine:
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
            "node": g.node or node,
        }
        for g in inventory
    ]
    names = list(dict.fromkeys(g["node"] for g in gpus)) or [node]
    return [
        {"name": n, "backend": backend, "gpus": [g for g in gpus if g["node"] == n]} for n in names
    ]


def health(state: AppState, unit: str, jobs: dict[str, Any]) -> dict[str, Any]:
    """A function's jobs by status and its workers by state (all its pools, policies' too)."""
    workers = Counter(
        w.state.value for p in state.all_pools() if p.unit == unit for w in p.workers.values()
    )
    return {
        "jobs": jobs,
        "workers": {
            "starting": workers["STARTING"],
            "idle": workers["IDLE"],
            "busy": workers["BUSY"],
            "draining": workers["DRAINING"],
        },
        "version": state.version,
    }


def env_users(apps: Iterable[AppState]) -> dict[str, list[str]]:
    """Env id -> the deployed versions whose functions run in it (`app v3: fn, Cls`)."""
    users: dict[str, list[str]] = {}
    for app in apps:
        by_env: dict[str, list[str]] = {}
        for unit, pool in app.pools.items():
            if pool.spec.env:
                by_env.setdefault(pool.spec.env, []).append(unit)
        for env_id, units in by_env.items():
            users.setdefault(env_id, []).append(f"{app.name} v{app.version}: {', '.join(units)}")
    return users


def unsandboxed(app: AppState, sandboxed: bool, why: str | None, settings: Settings) -> list[str]:
    """A deploy's warning when its calls will fail for want of a worker sandbox."""
    reasons = {
        refusal(
            sandboxed=sandboxed,
            workspace=app.workspace,
            tenant_isolation=settings.tenant_isolation,
            block_network=pool.spec.block_network,
        )
        for pool in app.pools.values()
    }
    return [
        f"this server runs no worker sandbox ({why}); its calls will fail: " + r
        for r in sorted(r for r in reasons if r is not None)
    ]


def deployed(app: AppState, warnings: list[str]) -> dict[str, Any]:
    """The answer to a deploy: the version made current, and what its caller should know."""
    return {
        "app": app.name,
        "version": app.version,
        "functions": list(app.functions),
        "bundle": app.bundle,
        "envs": app.describe()["envs"],
        "warnings": warnings,
    }


def tally(
    counts: Counter[str], live: Iterable[Job], key: tuple[str, str, str], retried: int
) -> dict[str, int]:
    """Jobs of one function by state: live ones (those of `live` of function `key`) counted now,
    ended ones (`counts`) since ever, and those queued again by a retry since the server began."""
    ws, app, fn = key
    mine = [j for j in live if j.app == app and j.function == fn and j.workspace == ws]
    return {
        "in_queue": sum(1 for j in mine if j.status is JobStatus.IN_QUEUE),
        "in_progress": sum(1 for j in mine if j.status is JobStatus.IN_PROGRESS),
        "completed": counts["COMPLETED"],
        "failed": counts["FAILED"],
        "cancelled": counts["CANCELLED"],
        "timed_out": counts["TIMED_OUT"],
        "retried": retried,
    }
