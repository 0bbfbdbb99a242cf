"""The worker lifecycle and its protocol: start, the control channel, ready, drain, kill, exit.

This room owns the live workers and the socket they connect back to. It starts them through a
`Backend` (it knows no backend's internals), authenticates each connection by the worker's own
secret, and reports what happens to a worker through `Events`: the plane routes a job's result
to dispatch, a log line to the logs, an exit to metering, dispatch and scaling.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.backends.base import Backend, Launch
from ember.control.errors import job_error
from ember.control.records import Pool, Worker
from ember.core.autoscaler import WorkerState
from ember.core.placement import Gpu, Placed
from ember.core.pricing import DEFAULT_CPU, DEFAULT_MEMORY_GIB, Resources
from ember.worker import protocol

log = logging.getLogger("ember.control")

HELLO_DEADLINE_S = 5.0
"""How long a new control connection may take to say who it is."""
MAX_PENDING = 64
"""Control connections waiting for their hello at once; a newer one closes the oldest."""


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid: int = struct.unpack("3i", creds)[0]
    return pid or None


def _descends_from(pid: int, ancestor: int) -> bool:
    """`pid` is `ancestor` or below it (a sandbox puts a few processes in between)."""
    for _ in range(8):
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(") ", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


@dataclass(frozen=True, slots=True)
class Events:
    """What the lifecycle tells the rest of the plane (the plane fills it in)."""

    worker_ready: Callable[[Worker], None]
    """Imported and its `@enter` hooks done: it can take jobs."""
    worker_message: Callable[[Worker, dict[str, Any]], None]
    """A frame about its jobs: result, output, log."""
    worker_exited: Callable[[Worker, int], None]
    """Gone (already out of `workers` and its pool); the code is -1 when unknown."""


class Workers:
    def __init__(
        self,
        backend: Backend,
        events: Events,
        drain_grace_s: float,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
    ) -> None:
        self.backend = backend
        self.events = events
        self.drain_grace_s = drain_grace_s
        self._spawn = spawn
        """Runs a coroutine as a task the plane tracks (and cancels at stop)."""
        self.workers: dict[str, Worker] = {}
        self.control_addr = ""
        self._server: asyncio.Server | None = None
        self._unix: asyncio.Server | None = None
        self._pending: dict[asyncio.StreamWriter, float] = {}
        """Connections that have not said hello yet, and since when."""

    async def listen(self, unix_path: Path | None = None) -> None:
        """Open the control channel that workers connect back to: a TCP port on loopback (for
        workers elsewhere) and, given `unix_path`, a Unix socket there (local and sandboxed
        workers: the server learns from the kernel which process is on the other end)."""
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.control_addr = f"{host}:{port}"
        if unix_path is not None:
            self._unix = await asyncio.start_unix_server(self._on_connection, path=str(unix_path))
            # sandboxed workers run as `nobody`; the directory above keeps everyone else out
            os.chmod(unix_path, 0o666)

    def close(self) -> None:
        for server in (self._server, self._unix):
            if server is not None:
                server.close()

    async def stop_all(self, grace_s: float) -> None:
        """Drain every worker (exit hooks get `grace_s`), kill the ones still there, wait a
        few seconds for them to exit, and stop listening."""
        for w in list(self.workers.values()):
            self.drain(w, reason="server stopping")
        await self._until_none_live(grace_s)
        for w in list(self.workers.values()):
            self.kill(w, "server stopping")
        await self._until_none_live(5.0)
        self.close()

    async def _until_none_live(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.workers and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # ----------------------------------------------------------------- views
    def of(self, workspace: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.pool.workspace == workspace]

    def live(self) -> Iterable[Worker]:
        return self.workers.values()

    # ----------------------------------------------------------------- start
    def start(self, pool: Pool, fit: Placed) -> Worker:
        """A new worker of `pool` on the GPUs of `fit`; it starts in the background."""
        spec = pool.spec
        gpu_count = float(len(fit.gpus))
        if fit.memory_mib is not None and (gpus := self._gpus(fit.gpus)):
            gpu_count = fit.memory_mib / (gpus[0].memory_mib or 1)
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
        self._spawn(self._run(w))
        return w

    def _gpus(self, indexes: tuple[int, ...]) -> tuple[Gpu, ...]:
        """The inventory's GPUs of those indexes (a cluster's have gaps where a node left)."""
        by_index = {g.index: g for g in self.backend.inventory}
        return tuple(by_index[i] for i in indexes if i in by_index)

    async def _run(self, w: Worker) -> None:
        launch = Launch(
            w.id,
            w.secret,
            self.control_addr,
            w.pool.bundle,
            w.pool.app,
            w.pool.unit,
            w.pool.spec.scaling.concurrency,
            self._gpus(w.gpus),
            w.gpu_memory_mib,
            w.pool.env,
            workspace=w.pool.workspace,
            block_network=w.pool.spec.block_network,
            runtime=w.pool.runtime,
            root=w.pool.root,
        )
        try:
            w.process = await self.backend.start(launch)
        except Exception as exc:  # could not even start a process
            w.fatal = job_error(type(exc).__name__, f"could not start a worker: {exc}")
            self._on_exit(w, -1)
            return
        w.pid = w.process.pid
        if w.stop_reason is not None:  # stopped while it was being started
            w.process.kill()
        # As in Modal, `timeout` also bounds a worker's start (imports and @enter hooks).
        asyncio.get_running_loop().call_later(w.pool.spec.timeout, self._on_startup_timeout, w)
        code = await w.process.wait()
        self._on_exit(w, code)

    def _on_startup_timeout(self, w: Worker) -> None:
        if w.ready is not None or w.id not in self.workers or w.stop_reason is not None:
            return
        w.fatal = job_error(
            "StartupTimeout",
            f"the worker did not become ready within the timeout of {w.pool.spec.timeout:g} s "
            "(imports or @enter hooks still running); it was stopped",
        )
        if w.process is not None:
            w.process.kill()

    # ----------------------------------------------------------------- stop
    def drain(self, w: Worker, reason: str) -> None:
        """Let a worker finish its jobs and exit hooks, then go; killed if it takes too long."""
        if w.state is WorkerState.DRAINING:
            return
        was_ready = w.state is not WorkerState.STARTING
        w.state = WorkerState.DRAINING
        w.stop_reason = reason
        if not was_ready or w.writer is None:
            self.kill(w, reason)
            return
        w.send(protocol.encode({"t": "drain"}))
        grace = self.drain_grace_s + (w.pool.spec.timeout if w.running else 0.0)
        w.kill_timer = asyncio.get_running_loop().call_later(
            grace, self.kill, w, f"{reason}; did not drain in time"
        )

    def kill(self, w: Worker, reason: str) -> None:
        w.stop_reason = w.stop_reason or reason
        w.state = WorkerState.DRAINING
        if w.process is not None:
            w.process.kill()

    def _on_exit(self, w: Worker, code: int) -> None:
        if self.workers.pop(w.id, None) is None:
            return
        w.pool.workers.pop(w.id, None)
        if w.kill_timer is not None:
            w.kill_timer.cancel()
        w.state = WorkerState.STOPPED
        self.events.worker_exited(w, code)

    # ----------------------------------------------------------------- the control channel
    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Authenticate, then relay frames. Before the hello, a connection may send one small
        frame within a deadline; at most MAX_PENDING wait at once (the oldest goes first)."""
        self._admit(writer)
        try:
            hello = await asyncio.wait_for(
                protocol.read(reader, limit=protocol.MAX_HELLO), HELLO_DEADLINE_S
            )
        except (TimeoutError, ValueError):
            hello = None
        finally:
            self._pending.pop(writer, None)
        w = await self._authenticate(hello, writer)
        if w is None:
            writer.close()
            return
        w.writer = writer
        try:
            while (msg := await protocol.read(reader)) is not None:
                self._on_message(w, msg)
        except ValueError as exc:  # a frame over the limit, or not JSON: it is not our worker
            log.warning("worker %s sent a bad frame (%s); stopping it", w.id, exc)
        finally:
            writer.close()
            # A worker without its connection is of no use; its exit code tells what happened.
            if w.id in self.workers and w.process is not None:
                w.process.kill()

    def _admit(self, writer: asyncio.StreamWriter) -> None:
        while len(self._pending) >= MAX_PENDING:
            oldest = min(self._pending, key=self._pending.__getitem__)
            self._pending.pop(oldest)
            oldest.close()
        self._pending[writer] = time.monotonic()

    async def _authenticate(self, hello: Any, writer: asyncio.StreamWriter) -> Worker | None:
        """The worker the hello names, if its secret matches, the worker has no connection yet,
        and (on the Unix socket) the process on the other end is that worker's own."""
        if not isinstance(hello, dict) or hello.get("t") != "hello":
            return None
        worker_id, secret = hello.get("worker"), hello.get("secret")
        if not isinstance(worker_id, str) or not isinstance(secret, str):
            return None
        w = self.workers.get(worker_id)
        if w is None or w.writer is not None or not secrets.compare_digest(secret, w.secret):
            return None
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            deadline = time.monotonic() + HELLO_DEADLINE_S
            while w.process is None and time.monotonic() < deadline:  # its start still returning
                await asyncio.sleep(0.001)
            peer = _peer_pid(sock)
            if peer is None or w.process is None or not _descends_from(peer, w.process.pid):
                log.warning("refused a hello as %s from process %s, not its own", w.id, peer)
                return None
            w.pid = peer
        return w

    def _on_message(self, w: Worker, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "ready":
            w.ready = time.monotonic()
            w.load_ms = float(msg.get("load_ms", 0.0))
            if w.state is WorkerState.STARTING:
                w.state = WorkerState.IDLE
                w.idle_since = w.ready  # last_used stays 0: warmest means it ran a job
            self.events.worker_ready(w)
        elif t == "fatal":
            w.fatal = msg["error"]
        else:
            self.events.worker_message(w, msg)
