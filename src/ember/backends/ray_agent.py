"""What the Ray backend runs on each node of the cluster (`backends/ray.py` drives them).

`NodeAgent`: one per node, a `LocalBackend` there (templates, sandbox, the worker command) and
the worker processes it started. `Lease`: one per worker with GPUs, created with `num_gpus` and
the accelerator, so that Ray holds the worker's GPUs and names the ones it may see.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

from ember.backends.base import Launch


class NodeAgent:
    """Runs on one node as a Ray actor: a LocalBackend there, and the workers it started."""

    def __init__(self, options: dict[str, Any]) -> None:
        from ember.backends.gpus import discover
        from ember.backends.local import LocalBackend
        from ember.backends.sandbox import make_sandbox

        self.real = discover()
        sandbox, _ = make_sandbox(
            options["sandbox"], Path(options["data_dir"]), Path(options["control_socket"])
        )
        self.local = LocalBackend(
            Path(options["log_dir"]),
            templates=options["templates"],
            inventory=self.real,
            control_socket=Path(options["control_socket"]),
            sandbox=sandbox,
            isolated_only=options["isolated_only"],
        )
        self.procs: dict[str, Any] = {}
        self.lines: dict[tuple[str, str], list[list[Any]]] = {}

    def facts(self) -> dict[str, Any]:
        """What the server cannot see from Ray: the node's real GPUs (NVML), its host."""
        gpus = [(g.type, g.memory_mib, g.uuid) for g in self.real]
        return {"gpus": gpus, "host": socket.gethostname(), "pid": os.getpid()}

    async def prepare(self, bundle: Path, app: str, unit: str, kw: dict[str, Any]) -> None:
        key = (str(bundle), unit)
        sink = self.lines.setdefault(key, [])
        await self.local.prepare(bundle, app, unit, on_log=sink.extend, **kw)

    def logs(self) -> dict[tuple[str, str], list[list[Any]]]:
        """The templates' output since the last call (the server puts it in its log store)."""
        out = {k: v[:] for k, v in self.lines.items() if v}
        for v in self.lines.values():
            v.clear()
        return out

    async def imported(self, bundle: Path, unit: str, timeout: float) -> str | None:
        return await self.local.imported(bundle, unit, timeout)

    def sweep(self, idle_s: float, budget_bytes: int) -> None:
        self.local.sweep(idle_s, budget_bytes)

    def retire(self, bundle: Path, unit: str) -> None:
        self.local.retire(bundle, unit)
        self.lines.pop((str(bundle), unit), None)

    async def start(self, launch: Launch, visible: list[str]) -> int:
        """Start (fork) the worker; its pid. It sees the GPUs Ray gave its lease, if real."""
        if self.real:
            launch = replace(launch, env={**launch.env, "CUDA_VISIBLE_DEVICES": ",".join(visible)})
        proc = await self.local.start(launch)
        self.procs[launch.worker_id] = proc
        return int(proc.pid)

    async def wait(self, worker_id: str) -> int:
        proc = self.procs.get(worker_id)
        if proc is None:
            return -1
        try:
            return int(await proc.wait())
        finally:
            self.procs.pop(worker_id, None)

    def kill(self, worker_id: str) -> None:
        if (proc := self.procs.get(worker_id)) is not None:
            proc.kill()

    async def close(self) -> None:
        for proc in list(self.procs.values()):
            proc.kill()
        await self.local.close()


class Lease:
    """A Ray actor that holds a worker's GPUs (`num_gpus`, the accelerator) on its node."""

    def gpu_ids(self) -> list[str]:
        import ray

        return [str(i) for i in ray.get_gpu_ids()]
