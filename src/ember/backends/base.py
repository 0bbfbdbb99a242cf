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


@dataclass(frozen=True)
class Runtime:
    """The Python a function's workers run in when it is not the server's own: a built Env."""

    python: Path
    """Its interpreter (a venv's `bin/python`)."""
    paths: tuple[Path, ...] = ()
    """What that interpreter needs to see, read-only, inside a sandbox: the venv, the base
    interpreter it was made from, ember's runtime directory."""
    variables: dict[str, str] = field(default_factory=dict)
    """The Env's own environment variables (`Env.env({...})`); secrets are set after them."""


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
    runtime: Runtime | None = None
    """None: the server's own Python."""
    root: Path | None = None
    """The bundle's root (its sys.path entry and working dir); None: the bundle file's dir."""


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

    @property
    def inventory(self) -> tuple[Gpu, ...]:
        """The GPUs workers may be placed on, discovered or declared; on a cluster it changes
        as nodes join and leave (read it each time, do not keep it)."""
        ...

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
        """Get ready to start workers of a function version fast (a template, an image);
        `on_log` takes what the user's code printed while it was being made ready. Where
        templates are off, a check-only import starts instead, so `imported` can still tell."""

    async def imported(self, bundle: Path, unit: str, timeout: float) -> str | None:
        """Wait until the version's code has been imported where its workers run: None when it
        imported (or nothing could tell within `timeout`), else the error with its traceback."""
        ...

    def sweep(self, idle_s: float, budget_bytes: int) -> list[tuple[str, str]]:
        """Stop templates unused for `idle_s`, and the least recently used beyond a memory
        budget (`core.templates`); each starts again when a worker of its version is needed.
        Returns (bundle, unit) of each stopped."""
        ...

    def retire(self, bundle: Path, unit: str) -> None:
        """That version starts no more workers; its running ones are stopped by the plane."""

    async def start(self, launch: Launch) -> WorkerProcess:
        """Start one worker; it connects to `launch.control` by itself."""
        ...

    async def close(self) -> None:
        """Release everything once the plane has stopped every worker."""
