"""Environments: the Envs built on this server, their builds in flight, and what runs in them.

An Env is asked for by its spec (`POST /v1/envs`); its id is the hash of that spec and of what
this server adds to it (its Python version, the AI base's own id), so the same request finds
the same build. A build runs once however many deploys ask for it at the same time: the second
asker gets the first one's progress. The AI base (torch, transformers, safetensors, numpy,
accelerate) is built once per server as an Env of its own; an Env on it resolves the base's
packages pinned to the base's lock (less any the function pins itself) plus its own, and uv
installs them as hard links into its cache, so the base's files exist once on disk.

Each workspace has its own rows (what `ember env list` shows and `ember env prune` removes); the
venvs themselves hold public packages only (an Env's variables live in its row, not its venv),
so identical Envs of two workspaces share one directory. Builds run with uv as the server's user,
from wheels only: no package's setup code runs here (`ember.envs.builder`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select

from ember.backends.base import Runtime
from ember.envs.builder import (
    Builder,
    BuildError,
    Built,
    Plan,
    Progress,
    is_built,
    runtime_dir,
    server_python,
)
from ember.envs.pipconf import PackageSources, local_wheel, package_sources
from ember.envs.spec import AI_PACKAGES, EnvSpec, EnvSpecError, check_requirements, names_of
from ember.store import tables
from ember.store.writer import Writer

log = logging.getLogger("ember.envs")

FAILED_KEPT_S = 600.0
"""How long a failed build's message and log stay readable (its deploy polls for them)."""


class EnvError(ValueError):
    """An Env request that cannot be built as written (HTTP 422)."""


@dataclass
class EnvRecord:
    """A built Env as one workspace knows it."""

    id: str
    spec: EnvSpec
    python_version: str
    lock: str
    disk_bytes: int
    own_bytes: int
    build_s: float
    created_at: float

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": "ready",
            "spec": self.spec.to_dict(),
            "python_version": self.python_version,
            "packages": lock_packages(self.lock),
            "disk_bytes": self.disk_bytes,
            "own_bytes": self.own_bytes,
            "build_s": round(self.build_s, 3),
            "created_at": self.created_at,
        }


@dataclass
class Build:
    """A build in flight (or just failed), shared by everyone who asked for its Env."""

    id: str
    spec: EnvSpec
    started: float = field(default_factory=time.time)
    phase: str = "queued"
    detail: str = ""
    error: str | None = None
    log: str = ""
    ended: float | None = None
    workspaces: set[str] = field(default_factory=set)
    """Who asked for it: each gets its row once it is built."""
    task: asyncio.Task[Built] | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": "failed" if self.error is not None else "building",
            "spec": self.spec.to_dict(),
            "phase": self.phase,
            "detail": self.detail,
            "error": self.error,
            "log": self.log if self.error is not None else None,
            "elapsed_s": round((self.ended or time.time()) - self.started, 3),
        }


def lock_packages(lock: str) -> list[str]:
    """`name==version` of each package of a lock, without hashes and comments."""
    out = []
    for line in lock.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "--", "\\")) and "==" in line:
            out.append(line.split()[0].rstrip("\\").strip())
    return out


class Environments:
    def __init__(self, envs_dir: Path, sources: PackageSources | None = None) -> None:
        self.dir = envs_dir
        self.sources = sources if sources is not None else package_sources()
        self.records: dict[tuple[str, str], EnvRecord] = {}
        self.builds: dict[str, Build] = {}
        """By Env id: in flight, or failed within FAILED_KEPT_S."""
        self.python = server_python()
        self.python_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        self._builder: Builder | None = None
        self._base_lock = asyncio.Lock()
        self.writer: Writer
        """Set once the plane starts."""

    @property
    def builder(self) -> Builder:
        if self._builder is None:
            self._builder = Builder(self.dir, self.sources)
        return self._builder

    def load(self, conn: Connection) -> None:
        for row in conn.execute(select(tables.envs)).mappings():
            spec = EnvSpec.from_dict(json.loads(row["spec"]))
            self.records[(row["workspace"], row["id"])] = EnvRecord(
                row["id"],
                spec,
                row["python_version"],
                row["lock"],
                row["disk_bytes"],
                row["own_bytes"],
                row["build_s"],
                row["created_at"],
            )

    async def build_missing(self, engine: Engine) -> None:
        """Build the Envs the store records that this server lacks (its first start on a store
        another server built them on, or a takeover), from their specs, before any app is
        loaded: an app whose Env is not built here cannot serve."""
        await asyncio.to_thread(self._load_from, engine)
        missing = {r.id: (ws, r.spec) for (ws, _), r in self.records.items()}
        for env_id, (workspace, spec) in sorted(missing.items()):
            if is_built(self.dir, env_id):
                continue
            log.warning("building Env %s (recorded in the store, not built here)", env_id)
            try:
                await self._make(spec, env_id, lambda phase, detail: None, {workspace})
            except Exception:
                log.exception("building Env %s failed: the apps that use it cannot serve", env_id)

    def _load_from(self, engine: Engine) -> None:
        with engine.connect() as conn:
            self.load(conn)

    # ----------------------------------------------------------------- identity
    def _torch(self) -> str:
        pin = local_wheel("torch", self.sources, "cp" + self.python_version.replace(".", ""))
        return f"torch=={pin}" if pin else "torch"

    def _base_spec(self, spec: EnvSpec) -> EnvSpec:
        return EnvSpec(base="ai", python=spec.python)

    def id_of(self, spec: EnvSpec) -> str:
        inputs: dict[str, Any] = {"python": spec.python or self.python_version}
        if spec.base == "ai":
            inputs["torch"] = self._torch()
            if spec != self._base_spec(spec):
                inputs["base"] = self.id_of(self._base_spec(spec))
        return spec.digest(inputs)

    # ----------------------------------------------------------------- building
    def request(self, workspace: str, raw: Any) -> dict[str, Any]:
        """Find the Env `raw` describes, or start its build; its view either way."""
        try:
            spec = EnvSpec.from_dict(raw)
            check_requirements(spec.packages)
            if spec.lock is not None:
                check_requirements([line.split()[0] for line in spec.lock])
        except EnvSpecError as exc:
            raise EnvError(str(exc)) from None
        env_id = self.id_of(spec)
        if (workspace, env_id) in self.records:
            return self.records[(workspace, env_id)].view()
        self._forget_failures()
        build = self.builds.get(env_id)
        if build is None or build.error is not None:  # a failed one is tried anew when asked
            build = self.builds[env_id] = Build(env_id, spec)
            build.task = asyncio.get_running_loop().create_task(self._build(build))
            build.task.add_done_callback(_quiet)
        build.workspaces.add(workspace)
        return build.view()

    def _forget_failures(self) -> None:
        now = time.time()
        for env_id, b in list(self.builds.items()):
            if b.ended is not None and now - b.ended > FAILED_KEPT_S:
                del self.builds[env_id]

    def view(self, workspace: str, env_id: str, with_builds: bool = False) -> dict[str, Any] | None:
        record = self.records.get((workspace, env_id))
        if record is not None:
            return record.view()
        build = self.builds.get(env_id)
        if with_builds and build is not None and workspace in build.workspaces:
            return build.view()  # another workspace's build of the same content stays unseen
        return None

    async def _build(self, build: Build) -> Built:
        def progress(phase: str, detail: str) -> None:
            build.phase, build.detail = phase, detail

        try:
            built = await self._make(build.spec, build.id, progress, build.workspaces)
        except BuildError as exc:
            build.error, build.log, build.ended = str(exc), exc.log, time.time()
            log.warning("building %s failed: %s", build.id, exc)
            raise
        except Exception as exc:
            build.error, build.ended = f"{type(exc).__name__}: {exc}", time.time()
            log.exception("building %s failed", build.id)
            raise
        for workspace in sorted(build.workspaces):
            await self._record(workspace, build.spec, built)
        self.builds.pop(build.id, None)
        return built

    async def _make(
        self, spec: EnvSpec, env_id: str, progress: Progress, workspaces: set[str]
    ) -> Built:
        """Build `spec` (its base first, for an Env on the AI base), unless its directory is
        already built (another workspace's identical Env)."""
        python = spec.python or self.python
        if spec.base == "ai" and spec.lock is None:
            base = await self._base(spec, progress, workspaces)
            if spec == self._base_spec(spec):
                return base
            own = names_of(spec.packages)
            pins = tuple(p for p in lock_packages(base.lock) if names_of([p]).isdisjoint(own))
            reqs = (*AI_PACKAGES, *spec.packages)
            plan = Plan(
                env_id, python, requirements=reqs, constraints=pins, base_dir=self.dir / base.id
            )
        elif spec.lock is not None:
            plan = Plan(env_id, python, lock=spec.lock)
        else:
            plan = Plan(env_id, python, requirements=spec.packages)
        return self._found(env_id) or await self.builder.build(plan, progress)

    async def _base(self, spec: EnvSpec, progress: Progress, workspaces: set[str]) -> Built:
        """The AI base this server shares, built first when it is not yet (one build at a time,
        whoever asks); each workspace that stands on it gets its row (`ember env list`)."""
        base_spec = self._base_spec(spec)
        base_id = self.id_of(base_spec)
        async with self._base_lock:
            built = self._found(base_id)
            if built is None:
                progress("base", "building the shared AI base (once per server)")
                requirements = (*AI_PACKAGES[1:], self._torch())
                plan = Plan(base_id, spec.python or self.python, requirements=requirements)
                built = await self.builder.build(plan, progress)
            for ws in sorted(workspaces):
                await self._record(ws, base_spec, built)
        return built

    def _found(self, env_id: str) -> Built | None:
        """The Env already built on disk and recorded (by any workspace), or None."""
        if not is_built(self.dir, env_id):
            return None
        for (_, other), record in self.records.items():
            if other == env_id:
                d = self.dir / env_id
                return Built(
                    env_id,
                    d,
                    d / "bin" / "python",
                    record.python_version,
                    record.lock,
                    record.disk_bytes,
                    record.own_bytes,
                    0.0,
                )
        return None  # on disk but recorded nowhere (a crash between the two): built again

    async def _record(self, workspace: str, spec: EnvSpec, built: Built) -> EnvRecord:
        record = EnvRecord(
            built.id,
            spec,
            built.python_version,
            built.lock,
            built.disk_bytes,
            built.own_bytes,
            built.build_s,
            time.time(),
        )
        if (workspace, built.id) in self.records:
            return self.records[(workspace, built.id)]
        self.records[(workspace, built.id)] = record

        def write(conn: Connection) -> None:
            conn.execute(
                insert(tables.envs).values(
                    workspace=workspace,
                    id=built.id,
                    spec=json.dumps(spec.to_dict()),
                    python_version=built.python_version,
                    lock=built.lock,
                    disk_bytes=built.disk_bytes,
                    own_bytes=built.own_bytes,
                    build_s=built.build_s,
                    created_at=record.created_at,
                )
            )

        await self.writer.submit(write)
        return record

    async def close(self) -> None:
        """Stop the builds in flight (uv is killed; a half-built venv is removed)."""
        tasks = [b.task for b in self.builds.values() if b.task is not None and not b.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ----------------------------------------------------------------- serving
    def runtime(self, workspace: str, env_id: str) -> Runtime | None:
        """How workers run in a built Env of the workspace; None when it has no such Env."""
        record = self.records.get((workspace, env_id))
        if record is None or not is_built(self.dir, env_id):
            return None
        venv = self.dir / env_id
        paths = [venv, runtime_dir(self.dir), _interpreter_prefix(venv)]
        return Runtime(venv / "bin" / "python", tuple(paths), dict(record.spec.variables))

    def of(self, workspace: str) -> list[EnvRecord]:
        return sorted(
            (r for (ws, _), r in self.records.items() if ws == workspace),
            key=lambda r: r.created_at,
        )

    async def prune(self, workspace: str, in_use: set[str], dry_run: bool) -> list[str]:
        """Remove the workspace's Envs that no live version uses (and the AI base, when no Env of
        any workspace stands on it); a venv goes once no workspace has it."""
        unused = {
            r.id for r in self.of(workspace) if r.id not in in_use and r.id not in self.builds
        }
        needed_bases = {
            self.id_of(self._base_spec(r.spec))
            for (ws, env_id), r in self.records.items()
            if r.spec.base == "ai" and not (ws == workspace and env_id in unused)
        }
        gone = [r.id for r in self.of(workspace) if r.id in unused and r.id not in needed_bases]
        if dry_run or not gone:
            return gone

        def write(conn: Connection) -> None:
            e = tables.envs.c
            conn.execute(delete(tables.envs).where(e.workspace == workspace, e.id.in_(gone)))

        await self.writer.submit(write)
        for env_id in gone:
            del self.records[(workspace, env_id)]
            if not any(other == env_id for _, other in self.records):
                await asyncio.to_thread(shutil.rmtree, self.dir / env_id, True)
        return gone


def _interpreter_prefix(venv: Path) -> Path:
    """The installation the venv's Python comes from (pyvenv.cfg's `home` is its bin dir):
    a sandbox must see it, its standard library included."""
    try:
        for line in (venv / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                return Path(value.strip()).resolve().parent
    except OSError:
        pass
    return Path(server_python()).resolve().parent.parent


def _quiet(task: asyncio.Task[Built]) -> None:
    """A build's failure is in its view; the task's exception needs no other reader."""
    if not task.cancelled():
        task.exception()


__all__ = ["EnvError", "EnvRecord", "Environments", "lock_packages"]
