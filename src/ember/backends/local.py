"""The local backend: each worker is an OS process running `python -m ember.worker`.

Workers run in the server's own Python environment, in their own process session (a Ctrl-C in
the server's terminal reaches the server, which then stops them in order), with their raw
stdout/stderr in a per-worker file under the data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from ember.core.placement import Gpu


@dataclass
class Launch:
    worker_id: str
    secret: str
    control: str
    bundle: Path
    app: str
    unit: str
    concurrency: int
    gpus: tuple[Gpu, ...] = ()
    gpu_memory_mib: int | None = None


def gpu_env(gpus: tuple[Gpu, ...], gpu_memory_mib: int | None) -> dict[str, str]:
    """A worker sees only its own GPUs. Simulated GPUs exist for no driver, so a worker on one
    sees no CUDA device at all and learns its assignment from EMBER_GPU_* alone."""
    real = [g for g in gpus if not g.simulated]
    env = {
        "CUDA_VISIBLE_DEVICES": ",".join(g.uuid or str(g.index) for g in real),
        "EMBER_GPU_INDEXES": ",".join(str(g.index) for g in gpus),
        "EMBER_GPU_TYPE": gpus[0].type if gpus else "",
        "EMBER_GPU_SIMULATED": "1" if gpus and not real else "0",
    }
    if gpu_memory_mib is not None:
        env["EMBER_GPU_MEMORY_MIB"] = str(gpu_memory_mib)
    return env


class LocalProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid

    async def wait(self) -> int:
        return await self._proc.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class LocalBackend:
    name = "local"

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    async def start(self, launch: Launch) -> LocalProcess:
        env = dict(os.environ)
        env.update(
            EMBER_WORKER_ID=launch.worker_id,
            EMBER_WORKER_SECRET=launch.secret,
            EMBER_CONTROL=launch.control,
            EMBER_BUNDLE=str(launch.bundle),
            EMBER_APP=launch.app,
            EMBER_UNIT=launch.unit,
            EMBER_CONCURRENCY=str(launch.concurrency),
            PYTHONUNBUFFERED="1",
            **gpu_env(launch.gpus, launch.gpu_memory_mib),
        )
        with open(self.log_dir / f"{launch.worker_id}.log", "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ember.worker",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=str(launch.bundle.parent),
                start_new_session=True,
            )
        return LocalProcess(proc)
