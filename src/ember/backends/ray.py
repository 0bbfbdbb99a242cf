"""The Ray backend: each worker runs under a Ray actor that Ray placed with its GPUs.

The server is a Ray driver (`ray.init(address=...)`). On every alive node of the cluster it
keeps one `NodeAgent` actor (`num_cpus=0`, pinned to its node): a `LocalBackend` there, so a
node starts templates of each function version and forks workers from them in milliseconds,
sandboxed as on the local backend. A worker's GPUs are held by a `Lease` actor created with
`num_gpus` (a fraction for a `gpu_memory` share) and the node's `accelerator_type:<T>`
resource, pinned by a NodeAffinitySchedulingStrategy to the node that placement chose; the
worker process sees the GPU ids Ray assigned to its lease (`CUDA_VISIBLE_DEVICES`, where the node
has real GPUs; none where the GPUs are only declared to Ray, which are labelled simulated).

The inventory is read from `ray.nodes()` every few seconds: a node that joins adds its GPUs, one
that leaves takes them away, and its workers end as crashed workers do (code -1), so the plane
retries or fails their jobs per `retries`. A GPU's index is stable for as long as its node lives.

A lease outlives its worker by `LEASE_KEEP_S`, parked for the next worker on the same GPUs:
creating an actor starts a Ray worker process (about a second here), which a cold start on a
warm node must not pay. Parked leases hold Ray's GPU resources only while ember has those GPUs
free; another shape placed on them kills the parked lease first.

Workers reach the server over its Unix control socket and are peer-checked as local ones (their
pid descends from `WorkerProcess.pid`): so the nodes share this machine (or at least its data
dir and the socket's directory). See docs/scale-out.md, "Ray backend".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.backends.base import Launch, Runtime
from ember.backends.ray_agent import Lease, NodeAgent
from ember.core.placement import DEFAULT_MEMORY_MIB, Gpu

log = logging.getLogger("ember.backend")

REFRESH_S = 1.0
"""How often the cluster's nodes are read again (a node joining or leaving)."""
LEASE_KEEP_S = 60.0
"""How long a finished worker's GPU lease waits for the next worker on the same GPUs."""
KILL_GRACE_S = 5.0
"""After a kill, how long `wait` waits for the agent to report the exit before giving up."""
START_S = 60.0
"""The longest a worker's lease may wait for Ray to place it, and its agent to start it (the
plane's start-up timeout counts from there)."""
FORWARD_S = 5.0
"""How often template sweeps are passed on to the agents."""
NODE_LOST = -1
"""The exit code of a worker whose node left the cluster (as a crash)."""
ACCELERATOR = "accelerator_type:"
RAY_TYPES = {"A100-40G": "A100-40GB", "A100-80G": "A100-80GB"}
"""Ray's accelerator names that differ from ember's."""


class RayUnavailable(RuntimeError):
    """`--backend ray` without the `ray` package or a cluster to join."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable(
            "--backend ray needs the ray package: pip install 'ember[ray]'"
        ) from None
    return ray


@dataclass
class Node:
    """One alive node of the cluster, as the server knows it."""

    id: str
    ip: str
    agent: Any
    prepared: set[tuple[str, str]] = field(default_factory=set)
    real: list[tuple[str, int, str | None]] | None = None
    """Its NVML GPUs once its agent has said (None: not yet; [] none: declared only)."""
    facts_ref: Any = None
    lost: asyncio.Event | None = None


@dataclass
class Parked:
    lease: Any
    gpus: tuple[int, ...]
    since: float


class RayWorker:
    """A worker on a node of the cluster: its process (same machine: `pid` is its own) under
    the node's agent, and the lease that holds its GPUs."""

    def __init__(
        self, backend: RayBackend, launch: Launch, node: Node, pid: int, lease: Any, key: Any
    ) -> None:
        self.pid = pid
        self._backend = backend
        self._id = launch.worker_id
        self._gpus = tuple(g.index for g in launch.gpus)
        self._node = node
        self._lease = lease
        self._key = key
        self._killed = asyncio.Event()

    async def wait(self) -> int:
        """Its exit code, as the agent reports it; NODE_LOST where the node (or agent) died."""
        ref = asyncio.ensure_future(self._agent_wait())
        lost = asyncio.ensure_future(self._node.lost.wait()) if self._node.lost else None
        killed = asyncio.ensure_future(self._killed.wait())
        waiting = {f for f in (ref, lost, killed) if f is not None}
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if ref not in done and killed in done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(ref), KILL_GRACE_S)
            code = ref.result() if ref.done() else NODE_LOST
        finally:
            for f in waiting:
                f.cancel()
        if code == NODE_LOST:
            self._kill_here()
        self._backend.release(self._node, self._key, self._lease, self._gpus, code != NODE_LOST)
        return code

    async def _agent_wait(self) -> int:
        try:
            return int(await self._node.agent.wait.remote(self._id))
        except Exception as exc:  # RayActorError, node died, ...
            log.warning("worker %s: its Ray node or agent is gone (%s)", self._id, exc)
            return NODE_LOST

    def _kill_here(self) -> None:
        """The process itself, where its node is this machine and its agent cannot."""
        if self._backend.local_ip == self._node.ip:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self._node.agent.kill.remote(self._id)
        self._kill_here()
        self._killed.set()


class Gone:
    """A worker whose node left before it could start: it ends at once as a silent crash
    (the plane backs off and places it again on the nodes still there), not as a code error."""

    pid = -1

    async def wait(self) -> int:
        return NODE_LOST

    def kill(self) -> None:
        pass


class RayBackend:
    """Workers as processes under Ray actors on the nodes of a cluster (the module's
    docstring); a `Backend`."""

    name = "ray"

    def __init__(
        self,
        address: str | None,
        log_dir: Path,
        *,
        data_dir: Path,
        control_socket: Path,
        sandbox: str = "auto",
        templates: bool = True,
        isolated_only: bool = True,
    ) -> None:
        self.ray = _ray()
        try:
            self.ray.init(
                address=address or os.environ.get("RAY_ADDRESS") or "auto",
                namespace="ember",
                log_to_driver=False,
                configure_logging=False,
            )
        except ConnectionError as exc:
            raise RayUnavailable(f"cannot join the Ray cluster at {address}: {exc}") from None
        self.node = f"ray cluster {address or 'auto'}"
        self.local_ip: str = self.ray.util.get_node_ip_address()
        self.options = {
            "log_dir": str(log_dir),
            "data_dir": str(data_dir),
            "control_socket": str(control_socket),
            "sandbox": sandbox,
            "templates": templates,
            "isolated_only": isolated_only,
        }
        log_dir.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[str, Node] = {}
        self._gpus: tuple[Gpu, ...] = ()
        self._where: dict[int, tuple[str, str | None]] = {}
        """A GPU's index -> (its node, its Ray accelerator resource)."""
        self._index: dict[tuple[str, int], int] = {}
        """(node, Ray's GPU number there) -> ember's index, never reused."""
        self._parked: dict[Any, Parked] = {}
        self._recipes: dict[tuple[str, str], tuple[Path, str, dict[str, Any]]] = {}
        self._on_log: dict[tuple[str, str], Callable[[list[list[Any]]], None] | None] = {}
        self._refreshed = 0.0
        self._refreshing: asyncio.Future[None] | None = None
        self._forwarded = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        """The server's loop, where workers wait (set at the first start)."""
        self.refresh()

    # ----------------------------------------------------------------- the inventory
    @property
    def inventory(self) -> tuple[Gpu, ...]:
        """The cluster's GPUs now; read again (in a thread) when older than REFRESH_S."""
        if time.monotonic() - self._refreshed >= REFRESH_S and self._refreshing is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the last known
                loop = asyncio.get_running_loop()
                self._refreshing = loop.run_in_executor(None, self.refresh)
                self._refreshing.add_done_callback(self._refreshed_now)
        return self._gpus

    def _refreshed_now(self, fut: asyncio.Future[None]) -> None:
        self._refreshing = None
        if (exc := fut.exception()) is not None:
            log.warning("could not read the Ray cluster's nodes: %s", exc)

    def refresh(self) -> None:
        """Read the alive nodes and their GPUs; start agents on new nodes, let go of lost ones."""
        self._refreshed = time.monotonic()
        alive = [n for n in self.ray.nodes() if n.get("Alive")]
        ids = {n["NodeID"] for n in alive}
        for node_id in [k for k in self.nodes if k not in ids]:
            self._lost(self.nodes.pop(node_id))
        gpus: list[Gpu] = []
        where: dict[int, tuple[str, str | None]] = {}
        for n in alive:
            node = self.nodes.get(n["NodeID"]) or self._join(n)
            if node.real is None and node.facts_ref is not None:
                ready, _ = self.ray.wait([node.facts_ref], timeout=0)
                if ready:
                    with contextlib.suppress(Exception):
                        node.real = list(self.ray.get(node.facts_ref)["gpus"])
            resources = n.get("Resources", {})
            accel = next((k for k in sorted(resources) if k.startswith(ACCELERATOR)), None)
            for i in range(int(resources.get("GPU", 0))):
                real = node.real[i] if node.real and i < len(node.real) else None
                gpu_type = (accel or "").removeprefix(ACCELERATOR)
                gpu_type = RAY_TYPES.get(gpu_type, gpu_type) or (real[0] if real else "GPU")
                memory = real[1] if real else DEFAULT_MEMORY_MIB.get(gpu_type, 0)
                index = self._index.setdefault((node.id, i), len(self._index))
                gpus.append(
                    Gpu(index, gpu_type, memory, real is None, real[2] if real else None, node.id)
                )
                where[index] = (node.id, accel)
        self._gpus, self._where = tuple(gpus), where

    def _join(self, n: dict[str, Any]) -> Node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        agent = (
            self.ray.remote(NodeAgent)
            .options(
                num_cpus=0,
                max_concurrency=1000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            )
            .remote(self.options)
        )
        node = Node(n["NodeID"], n.get("NodeManagerAddress", ""), agent)
        node.facts_ref = agent.facts.remote()
        self.nodes[node.id] = node
        log.info("Ray node %s joined (%s)", node.id, n.get("Resources", {}))
        return node

    def _lost(self, node: Node) -> None:
        log.warning("Ray node %s left the cluster: its workers end as crashed", node.id)
        if node.lost is not None and self._loop is not None:  # refresh runs in a thread
            self._loop.call_soon_threadsafe(node.lost.set)
        for key in [k for k in self._parked if k[0] == node.id]:
            self._drop(self._parked.pop(key).lease)

    def _drop(self, actor: Any) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(actor)

    # ----------------------------------------------------------------- templates, per node
    async def prepare(
        self,
        bundle: Path,
        app: str,
        unit: str,
        secrets: dict[str, str] | None = None,
        *,
        workspace: str = "default",
        block_network: bool = False,
        on_log: Callable[[list[list[Any]]], None] | None = None,
        runtime: Runtime | None = None,
        root: Path | None = None,
    ) -> None:
        """Start the version's template on every node (a node joining later gets it at its
        first worker of the version)."""
        key = (str(bundle), unit)
        kw = {
            "secrets": secrets,
            "workspace": workspace,
            "block_network": block_network,
            "runtime": runtime,
            "root": root,
        }
        self._recipes[key] = (bundle, app, kw)
        self._on_log[key] = on_log
        await asyncio.gather(
            *(self._prepare_on(node, key) for node in list(self.nodes.values())),
            return_exceptions=True,
        )

    async def _prepare_on(self, node: Node, key: tuple[str, str]) -> None:
        if key in node.prepared or key not in self._recipes:
            return
        bundle, app, kw = self._recipes[key]
        node.prepared.add(key)
        await node.agent.prepare.remote(bundle, app, key[1], kw)

    async def imported(self, bundle: Path, unit: str, timeout: float) -> str | None:
        """Asked of every node: the first import error any of them saw."""
        asks = [n.agent.imported.remote(bundle, unit, timeout) for n in list(self.nodes.values())]
        for answer in await asyncio.gather(*asks, return_exceptions=True):
            if isinstance(answer, str):
                return answer
        return None

    def sweep(self, idle_s: float, budget_bytes: int) -> list[tuple[str, str]]:
        """Pass the sweep on to the agents, bring their templates' output in, and let go of
        leases parked past LEASE_KEEP_S (each node sweeps its own templates)."""
        _ = self.inventory  # read the nodes again if due
        now = time.monotonic()
        for key in [k for k, p in self._parked.items() if now - p.since > LEASE_KEEP_S]:
            self._drop(self._parked.pop(key).lease)
        if now - self._forwarded >= FORWARD_S:
            self._forwarded = now
            for node in list(self.nodes.values()):
                with contextlib.suppress(Exception):
                    node.agent.sweep.remote(idle_s, budget_bytes)
        if any(self._on_log.values()):
            for node in list(self.nodes.values()):
                task = asyncio.ensure_future(self._logs_of(node))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return []

    async def _logs_of(self, node: Node) -> None:
        with contextlib.suppress(Exception):
            for key, lines in (await node.agent.logs.remote()).items():
                if (sink := self._on_log.get(key)) is not None:
                    sink(lines)

    def retire(self, bundle: Path, unit: str) -> None:
        key = (str(bundle), unit)
        self._recipes.pop(key, None)
        self._on_log.pop(key, None)
        for node in list(self.nodes.values()):
            node.prepared.discard(key)
            with contextlib.suppress(Exception):
                node.agent.retire.remote(bundle, unit)

    # ----------------------------------------------------------------- workers
    async def start(self, launch: Launch) -> RayWorker | Gone:
        """A lease for its GPUs on the node placement chose (or none), then its process from
        that node's agent (forked from the node's template where one is ready)."""
        if launch.gpus:
            node_id, accel = self._where.get(launch.gpus[0].index, (launch.gpus[0].node, None))
        else:  # no GPU: this machine's node, where there is one
            here = [n for n in self.nodes.values() if n.ip == self.local_ip]
            node_id, accel = (here or list(self.nodes.values()) or [Node("", "", None)])[0].id, None
        node = self.nodes.get(node_id)
        if node is None:
            log.warning("worker %s: Ray node %s has left", launch.worker_id, node_id or "(none)")
            return Gone()
        self._loop = asyncio.get_running_loop()
        if node.lost is None:
            node.lost = asyncio.Event()
        lease, key, visible = None, None, []
        if launch.gpus:
            lease, key = await self._lease(node, launch, accel)
            try:  # Ray has placed it once it answers
                visible = await asyncio.wait_for(self._await(lease.gpu_ids.remote()), START_S)
            except Exception as exc:  # ActorUnschedulableError: the node has just left
                log.warning(
                    "worker %s: no lease on Ray node %s (%s)", launch.worker_id, node.id, exc
                )
                self._drop(lease)
                self._refreshed = 0.0  # read the nodes again now
                return Gone()
        try:
            await self._prepare_on(node, (str(launch.bundle), launch.unit))
        except Exception as exc:
            log.warning("template on node %s: %s", node.id, exc)
        try:
            pid = await asyncio.wait_for(
                self._await(node.agent.start.remote(launch, visible)), START_S
            )
        except self.ray.exceptions.RayActorError as exc:  # the agent died with its node
            log.warning(
                "worker %s: the agent of node %s is gone (%s)", launch.worker_id, node.id, exc
            )
            if lease is not None:
                self.release(node, key, lease, tuple(g.index for g in launch.gpus), False)
            return Gone()
        except Exception as exc:
            if lease is not None:
                self.release(node, key, lease, tuple(g.index for g in launch.gpus), True)
            raise getattr(exc, "cause", None) or exc from None
        return RayWorker(self, launch, node, int(pid), lease, key)

    @staticmethod
    async def _await(ref: Any) -> Any:
        return await ref

    async def _lease(self, node: Node, launch: Launch, accel: str | None) -> tuple[Any, Any]:
        """A parked lease of the same shape on the same GPUs, else a new one (parked ones on
        these GPUs of another shape go first, so that Ray has the GPUs to give)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        gpus = tuple(g.index for g in launch.gpus)
        share: float = float(len(gpus))
        if launch.gpu_memory_mib is not None and launch.gpus[0].memory_mib:
            share = max(round(launch.gpu_memory_mib / launch.gpus[0].memory_mib, 4), 0.0001)
        key = (node.id, gpus, share)
        if (parked := self._parked.pop(key, None)) is not None:
            return parked.lease, key
        for k in [k for k, p in self._parked.items() if set(p.gpus) & set(gpus)]:
            self._drop(self._parked.pop(k).lease)
        lease = (
            self.ray.remote(Lease)
            .options(
                num_cpus=0,
                num_gpus=share,
                resources={accel: 0.001} if accel else {},
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.id, soft=False),
            )
            .remote()
        )
        return lease, key

    def release(self, node: Node, key: Any, lease: Any, gpus: tuple[int, ...], keep: bool) -> None:
        """A worker is gone: park its lease for the next one on its GPUs, or let it go."""
        if lease is None:
            return
        if keep and node.id in self.nodes and key not in self._parked:
            self._parked[key] = Parked(lease, gpus, time.monotonic())
        else:
            self._drop(lease)

    async def close(self) -> None:
        """Stop every agent's templates, let go of every actor, and leave the cluster."""
        closing = [n.agent.close.remote() for n in self.nodes.values()]
        with contextlib.suppress(Exception, TimeoutError):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 10)
        for parked in self._parked.values():
            self._drop(parked.lease)
        for node in self.nodes.values():
            self._drop(node.agent)
        self._parked, self.nodes = {}, {}
        self.ray.shutdown()
