"""The backend protocol: what starts and stops workers and knows the GPUs they may use.

The control plane speaks only this: `local` (processes on this machine, `backends/local.py`)
implements it today, and a cluster backend (one Ray actor per worker) implements the same. A
backend knows nothing of jobs, pools or scaling; it is told what to start (`Launch`) and hands
back a `WorkerProcess` to wait on or kill. Which GPUs a worker gets is decided by the core's
placement over `inventory`; the backend only makes the worker see them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ember.core.placement import Gpu


@dataclass
class Launch:
    """One worker to start: who it is, how it reaches the server, what it runs, on which GPUs."""

    worker_id: str
    secret: str
    control: str
    bundle: Path
    app: str
    unit: str
    concurrency: int
    gpus: tuple[Gpu, ...] = ()
    gpu_memory_mib: int | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)
    """The function's secrets (and EMBER_SECRET_KEYS naming them)."""
    workspace: str = "default"
    block_network: bool = False
    """No network at all, not even the machine's loopback (`@app.function(block_network=True)`)."""


class WorkerProcess(Protocol):
    """A started worker, wherever it runs."""

    pid: int

    async def wait(self) -> int:
        """Its exit code, once it has exited (-1 when it is unknown)."""
        ...

    def kill(self) -> None:
        """Stop it now; `wait` then returns."""


class Backend(Protocol):
    name: str
    """Shown in `/v1/nodes`: local, ray."""
    node: str
    """The node the workers run on, as people know it (a host name)."""
    inventory: tuple[Gpu, ...]
    """The GPUs workers may be placed on, discovered or declared."""

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
    ) -> None:
        """Get ready to start workers of a function version fast (a template, an image);
        `on_log` takes what the user's code printed while it was being made ready."""

    def retire(self, bundle: Path, unit: str) -> None:
        """That version starts no more workers; its running ones are stopped by the plane."""

    async def start(self, launch: Launch) -> WorkerProcess:
        """Start one worker; it connects to `launch.control` by itself."""
        ...

    async def close(self) -> None:
        """Release everything once the plane has stopped every worker."""
