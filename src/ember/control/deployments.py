"""Deployments: the apps of each workspace, their current version, its functions and pools.

A deploy validates the manifest, writes the new immutable version and its bundle, and replaces
the app; what happens to the old version's queued jobs and workers is decided here (`retire`)
and carried out by the plane. Where a function's secrets come from is asked of the caller
(`SecretEnv`), so this room knows nothing of the vault.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select, update

from ember.control.errors import NotFoundError, job_error
from ember.control.manifest import DeployError, validate_manifest
from ember.control.records import AppState, FunctionMeta, Job, Pool
from ember.core.names import under
from ember.core.placement import Gpu, Never, place
from ember.core.spec import FunctionSpec
from ember.store import tables
from ember.store.writer import Writer

SecretEnv = Callable[[str, tuple[str, ...]], dict[str, str]]
"""(workspace, secret names) -> the environment those secrets give a function's workers."""


@dataclass
class Retired:
    """What a redeploy leaves to do: the old version's pools (their workers drain, their
    templates retire) and the queued jobs whose function the new version no longer has."""

    pools: list[Pool]
    orphans: list[tuple[Job, dict[str, Any]]] = field(default_factory=list)
    """(job, the error it fails with)"""


class Deployments:
    def __init__(self, data_dir: Path, secret_env: SecretEnv) -> None:
        self.data_dir = data_dir
        self.secret_env = secret_env
        self.apps: dict[tuple[str, str], AppState] = {}
        """(workspace, app name) -> the app's current version."""
        self.writer: Writer
        """Set once the plane starts."""

    def load(self, conn: Connection) -> None:
        """Every deployed app at its current version, bundles written back where missing."""
        v = tables.versions.c
        for row in conn.execute(select(tables.apps)).mappings():
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
            self.apps[(row["workspace"], row["name"])] = self._build(
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

    def _build(
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
        bundle = under(self.data_dir, "bundles", workspace, name, f"v{version}", filename)
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
                    env=self.secret_env(workspace, spec.secrets),
                )
        return AppState(
            name, tags, version, filename, metas, pools, created_at, updated_at, workspace
        )

    async def deploy(
        self, workspace: str, manifest: Any, has_secret: Callable[[str, str], bool]
    ) -> tuple[AppState, AppState | None]:
        """Store a new version of an app and make it current; returns (new, old)."""
        m = validate_manifest(manifest)
        name, now = m["name"], time.time()
        for f in m["functions"]:
            for secret in f["spec"].get("secrets") or ():
                if not has_secret(workspace, secret):
                    raise DeployError(
                        f"{f['name']}: no secret named {secret!r} in workspace {workspace!r}; "
                        f"create it first with `ember secret set {secret} KEY=VALUE`"
                    )
        old = self.apps.get((workspace, name))
        version = old.version + 1 if old else 1
        created_at = old.created_at if old else now
        app = self._build(
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
        return app, old

    @staticmethod
    def retire(old: AppState, new: AppState) -> Retired:
        """A redeploy: queued jobs move to the new version's pools, call history carries over."""
        retired = Retired(old.all_pools())
        for pool in retired.pools:
            pool.active = False
            if pool.unit in new.pools:
                successor = new.pool(pool.unit, pool.policy)
                successor.hist, successor.last_call_end = pool.hist, pool.last_call_end
            while pool.queue:
                job = pool.queue.popleft()
                meta = new.functions.get(job.function)
                if meta is None:
                    error = job_error(
                        "FunctionNotFound", f"{job.function} was removed by redeploy v{new.version}"
                    )
                    retired.orphans.append((job, error))
                    continue
                job.unit, job.kind = meta.unit, meta.kind
                new.pool(meta.unit, job.policy).queue.append(job)
        return retired

    @staticmethod
    def unplaceable(app: AppState, inventory: tuple[Gpu, ...]) -> list[str]:
        """Units no GPU here could ever run: deployable (another server may have the GPU), but
        every call would fail, so the deploy says so."""
        warnings = []
        for unit, pool in app.pools.items():
            if pool.spec.gpu:
                fit = place(pool.spec.gpu, pool.spec.gpu_memory_mib, inventory, ())
                if isinstance(fit, Never):
                    warnings.append(f"{unit}: {fit.reason}; calls to it will be refused (422)")
        return warnings

    # ----------------------------------------------------------------- reading
    def apps_of(self, workspace: str) -> list[AppState]:
        return sorted(
            (a for (ws, _), a in self.apps.items() if ws == workspace), key=lambda a: a.name
        )

    def pools(self) -> Iterator[Pool]:
        """Every pool of every current version."""
        for app in list(self.apps.values()):
            yield from app.all_pools()

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

    def home_of(self, job: Job) -> Pool | None:
        """The pool of the current version that a queued (or requeued) job belongs in; sets
        its unit and kind from that version. None when its function is no longer deployed."""
        state = self.apps.get((job.workspace, job.app))
        meta = state.functions.get(job.function) if state else None
        if state is None or meta is None:
            return None
        job.unit, job.kind = meta.unit, meta.kind
        return state.pool(meta.unit, job.policy)

    def pool_of(self, job: Job) -> Pool | None:
        """The pool a job is in: its worker's, or the one it is queued in."""
        if job.worker is not None:
            return job.worker.pool
        state = self.apps.get((job.workspace, job.app))
        return state.pool(job.unit, job.policy) if state and job.unit in state.pools else None

    def users_of_secret(self, workspace: str, name: str) -> list[str]:
        return sorted(
            f"{app.name}/{meta.name}"
            for app in self.apps_of(workspace)
            for meta in app.functions.values()
            if name in meta.spec.secrets
        )

    def tags_of(self, pool: Pool) -> dict[str, str]:
        state = self.apps.get((pool.workspace, pool.app))
        return state.tags if state else {}
