"""Deployments: the apps of each workspace, their current version, its functions and pools.

A deploy validates the manifest, writes the new immutable version and its bundle, and replaces
the app; what happens to the old version's queued jobs and workers is decided here (`retire`)
and carried out by the plane. Where a function's secrets come from is asked of the caller
(`SecretEnv`), so this room knows nothing of the vault.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select, update

from ember.backends.base import Runtime
from ember.control.errors import NotFoundError, job_error
from ember.control.manifest import DeployError, validate_manifest
from ember.control.records import AppState, FunctionMeta, Job, Pool
from ember.core.names import under
from ember.core.placement import Gpu, Never, place
from ember.core.spec import FunctionSpec
from ember.envs.bundle import DEFAULT_LIMIT, BundleError, digest_of, extract, open_bundle
from ember.store import tables
from ember.store.writer import Writer

log = logging.getLogger("ember.control")

SecretEnv = Callable[[str, tuple[str, ...]], dict[str, str]]
"""(workspace, secret names) -> the environment those secrets give a function's workers."""
RuntimeOf = Callable[[str, str], Runtime | None]
"""(workspace, Env id) -> how workers run in that built Env, or None if the workspace has none."""
Ready = Callable[[AppState, bool], Awaitable[None]]
"""Gets a staged version ready to serve (its templates) and raises DeployError if its code
does not import; only then does the version become current."""


@dataclass
class Retired:
    """What a redeploy leaves to do: the old version's pools (their workers drain, their
    templates retire) and the queued jobs whose function the new version no longer has."""

    pools: list[Pool]
    orphans: list[tuple[Job, dict[str, Any]]] = field(default_factory=list)
    """(job, the error it fails with)"""


class Deployments:
    def __init__(
        self,
        data_dir: Path,
        secret_env: SecretEnv,
        runtime_of: RuntimeOf,
        bundle_limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.data_dir = data_dir
        self.secret_env = secret_env
        self.runtime_of = runtime_of
        self.bundle_limit = bundle_limit
        self.apps: dict[tuple[str, str], AppState] = {}
        """(workspace, app name) -> the app's current version."""
        self.bundles: set[tuple[str, str]] = set()
        """(workspace, digest) of every bundle stored."""
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        """One deploy of an app at a time: a version is staged, made ready, then committed."""
        self.writer: Writer
        """Set once the plane starts."""

    def load(self, conn: Connection, *, runs_here: bool = True) -> None:
        """Every deployed app at its current version, bundles written back where missing;
        swapped in whole (a standby loads again every second). `runs_here=False` (a standby,
        whose pools only validate calls): an Env not built here leaves no app out."""
        apps: dict[tuple[str, str], AppState] = {}
        v = tables.versions.c
        b = tables.bundles.c
        self.bundles = {
            (r.workspace, r.digest) for r in conn.execute(select(b.workspace, b.digest))
        }
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
            ws, name = row["workspace"], row["name"]
            root = self._root(ws, name, ver["version"])
            if ver["bundle"] is None:
                self._write_source(root, ver["filename"], ver["source"])
            elif not root.is_dir():
                self._extract(conn, ws, ver["bundle"], root)
            try:
                app = self._build(
                    ws,
                    name,
                    json.loads(row["tags"]),
                    ver["version"],
                    root,
                    ver["filename"],
                    json.loads(ver["functions"]),
                    row["created_at"],
                    row["updated_at"],
                    ver["bundle"],
                    ver["module"],
                    runs_here=runs_here,
                )
            except DeployError as exc:
                log.error("app %s/%s v%s cannot serve: %s", ws, name, ver["version"], exc)
                continue
            apps[(ws, name)] = app
        self.apps = apps

    # ----------------------------------------------------------------- bundles
    def _root(self, workspace: str, name: str, version: int) -> Path:
        return under(self.data_dir, "bundles", workspace, name, f"v{version}")

    @staticmethod
    def _write_source(root: Path, filename: str, source: str) -> None:
        path = root / filename
        if not path.exists() or path.read_text() != source:
            root.mkdir(parents=True, exist_ok=True)
            path.write_text(source)

    def _extract(self, conn: Connection, workspace: str, digest: str, root: Path) -> None:
        b = tables.bundles.c
        data = conn.execute(
            select(b.data).where(b.workspace == workspace, b.digest == digest)
        ).scalar_one_or_none()
        if data is None:
            raise DeployError(f"no bundle {digest[:12]} here: upload it first (PUT /v1/bundles)")
        if root.exists():  # a staged version that never became current
            shutil.rmtree(root)
        extract(open_bundle(data, limit=self.bundle_limit), root)

    def _extract_stored(self, workspace: str, digest: str, root: Path) -> None:
        """In a thread: the stored bundle onto disk for a staged version."""
        try:
            with self.writer.engine.connect() as conn:
                self._extract(conn, workspace, digest, root)
        except BundleError as exc:
            raise DeployError(f"the bundle cannot be unpacked: {exc}") from None

    def has_bundle(self, workspace: str, digest: str) -> bool:
        return (workspace, digest) in self.bundles

    async def put_bundle(self, workspace: str, digest: str, data: bytes) -> dict[str, Any]:
        """Store an uploaded bundle once its bytes are its digest and its files pass the
        checks an untrusted zip gets (paths, sizes, kinds). Raises BundleError saying why not."""
        if digest_of(data) != digest:
            raise BundleError(
                f"the body's sha256 is {digest_of(data)[:12]}..., not the {digest[:12]}... in the URL"
            )
        files = await asyncio.to_thread(open_bundle, data, limit=self.bundle_limit)
        size = sum(len(c) for _, c in files)
        if (workspace, digest) not in self.bundles:

            def write(conn: Connection) -> None:
                conn.execute(
                    insert(tables.bundles).values(
                        workspace=workspace,
                        digest=digest,
                        size=size,
                        files=len(files),
                        data=data,
                        created_at=time.time(),
                    )
                )

            await self.writer.submit(write)
            self.bundles.add((workspace, digest))
        return {"digest": digest, "size": size, "files": len(files)}

    # ----------------------------------------------------------------- versions
    def _build(
        self,
        workspace: str,
        name: str,
        tags: dict[str, str],
        version: int,
        root: Path,
        filename: str,
        functions: list[dict[str, Any]],
        created_at: float,
        updated_at: float,
        digest: str | None,
        module: str | None,
        *,
        runs_here: bool = True,
    ) -> AppState:
        bundle = root / filename
        metas: dict[str, FunctionMeta] = {}
        pools: dict[str, Pool] = {}
        for f in functions:
            spec = FunctionSpec.from_dict(f["spec"])
            metas[f["name"]] = FunctionMeta(f["name"], f["unit"], f["kind"], f["params"], spec)
            if f["unit"] not in pools:
                runtime = None
                if spec.env is not None:
                    runtime = self.runtime_of(workspace, spec.env)
                    if runtime is None and runs_here:
                        raise DeployError(
                            f"{f['name']}: no Env {spec.env} is built in workspace "
                            f"{workspace!r}; build it first (POST /v1/envs; `ember deploy` does)"
                        )
                pools[f["unit"]] = Pool(
                    name,
                    version,
                    f["unit"],
                    spec,
                    bundle,
                    workspace=workspace,
                    env=self.secret_env(workspace, spec.secrets),
                    runtime=runtime,
                    root=root,
                )
        return AppState(
            name,
            tags,
            version,
            filename,
            metas,
            pools,
            created_at,
            updated_at,
            workspace,
            bundle=digest,
            module=module,
        )

    async def deploy(
        self,
        workspace: str,
        manifest: Any,
        has_secret: Callable[[str, str], bool],
        ready: Ready,
    ) -> tuple[AppState, AppState | None]:
        """Stage a new version of an app, get it ready (`ready` raises if its code does not
        import), then store it and make it current; returns (new, old). A deploy that fails at
        any step leaves the app as it was."""
        m = validate_manifest(manifest)
        name = m["name"]
        for f in m["functions"]:
            for secret in f["spec"].get("secrets") or ():
                if not has_secret(workspace, secret):
                    raise DeployError(
                        f"{f['name']}: no secret named {secret!r} in workspace {workspace!r}; "
                        f"create it first with `ember secret set {secret} KEY=VALUE`"
                    )
        if m["bundle"] is not None and not self.has_bundle(workspace, m["bundle"]):
            raise DeployError(
                f"no bundle {m['bundle'][:12]}... in workspace {workspace!r}: upload it first "
                "(PUT /v1/bundles/{digest}; `ember deploy` does)"
            )
        lock = self._locks.setdefault((workspace, name), asyncio.Lock())
        async with lock:
            return await self._stage_and_commit(workspace, m, ready)

    async def _stage_and_commit(
        self, workspace: str, m: dict[str, Any], ready: Ready
    ) -> tuple[AppState, AppState | None]:
        name, now = m["name"], time.time()
        old = self.apps.get((workspace, name))
        version = old.version + 1 if old else 1
        created_at = old.created_at if old else now
        root = self._root(workspace, name, version)
        if m["bundle"] is None:
            if root.exists():
                shutil.rmtree(root)
            self._write_source(root, m["filename"], m["source"])
        else:
            await asyncio.to_thread(self._extract_stored, workspace, m["bundle"], root)
        if not (root / m["filename"]).is_file():
            shutil.rmtree(root, ignore_errors=True)
            raise DeployError(f"the bundle has no {m['filename']!r}, the file being deployed")
        try:
            app = self._build(
                workspace,
                name,
                m["tags"],
                version,
                root,
                m["filename"],
                m["functions"],
                created_at,
                now,
                m["bundle"],
                m["module"],
            )
            await ready(app, m["wait"])
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        source = m["source"] if m["source"] is not None else ""

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
                    source=source,
                    functions=json.dumps(m["functions"]),
                    created_at=now,
                    bundle=m["bundle"],
                    module=m["module"],
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
