"""The local backend: each worker is an OS process on this machine.

Workers run in the server's own Python environment, in their own process session (a Ctrl-C in
the server's terminal reaches the server, which then stops them in order), with their raw
stdout/stderr in a per-worker file under the data dir. Where a template of the function version
is ready, a worker is forked from it (milliseconds, the user's module already imported); where
none can serve (disabled, still starting, failed, crashed), it is started as a new
`python -m ember.worker` process, with the same behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from ember.backends.base import Launch
from ember.core.placement import Gpu

log = logging.getLogger("ember.backend")


SERVER_ONLY = ("EMBER_MASTER_KEY", "EMBER_TOKEN")
"""Variables of the server's environment that user code must never see."""


def base_env() -> dict[str, str]:
    """The server's environment without what is the server's alone."""
    return {k: v for k, v in os.environ.items() if k not in SERVER_ONLY}


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


class ForkedProcess:
    """A worker forked by a template: the template reaps it and reports its exit code."""

    def __init__(self, pid: int, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self._exited = exited

    async def wait(self) -> int:
        return await self._exited

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


class TemplateError(RuntimeError):
    pass


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] == "Z"
    except ProcessLookupError:
        return True
    except OSError:
        return False


class Template:
    """The server's side of one template process (see `ember.worker.template`)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.ready = False
        self.settled = asyncio.Event()
        """Set once the template is ready, has failed, or has exited."""
        self.retiring = False
        self._forks: dict[str, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._reader = asyncio.ensure_future(self._read())

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            if msg["t"] == "ready":
                self.ready = True
                self.settled.set()
            elif msg["t"] == "failed":
                log.warning("template failed, workers will be started plainly: %s", msg["error"])
                self.settled.set()
            elif msg["t"] == "forked" and (fut := self._forks.pop(msg["worker"], None)):
                self._exits[msg["pid"]] = loop.create_future()
                fut.set_result(msg["pid"])
            elif msg["t"] == "exited" and (done := self._exits.pop(msg["pid"], None)):
                done.set_result(msg["code"])
                self._retire_if_done()
        self.ready = False
        self.settled.set()
        for fut in self._forks.values():
            fut.set_exception(TemplateError("the template exited"))
        self._forks.clear()
        # Its workers outlive it (they watch the server, not the template): poll for their end.
        while self._exits:
            await asyncio.sleep(0.05)
            for pid in [p for p in self._exits if _gone(p)]:
                self._exits.pop(pid).set_result(-1)

    async def fork(self, launch: Launch, env: dict[str, str], log_path: Path) -> ForkedProcess:
        if not (self.ready and self.alive) or self.retiring:
            raise TemplateError("no template ready")
        assert self.proc.stdin is not None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._forks[launch.worker_id] = fut
        request = {"worker": launch.worker_id, "env": env, "log": str(log_path)}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        pid = await asyncio.wait_for(fut, 10)
        return ForkedProcess(pid, self._exits[pid])

    def retire(self) -> None:
        """Stop forking; the process ends once every worker it forked has exited."""
        self.retiring = True
        self._retire_if_done()

    def _retire_if_done(self) -> None:
        if self.retiring and not self._exits and self.alive:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


TEMPLATE_WAIT_S = 2.0
"""How long a worker start waits for its template to finish loading before starting plainly."""


class LocalBackend:
    """Workers as processes of this machine (see the module's docstring); a `Backend`."""

    name = "local"

    def __init__(
        self, log_dir: Path, *, templates: bool = True, inventory: tuple[Gpu, ...] = ()
    ) -> None:
        self.node = socket.gethostname()
        self.inventory = inventory
        self.log_dir = log_dir
        self.use_templates = templates
        self.templates: dict[tuple[str, str], Template] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def _env(self, launch: Launch) -> dict[str, str]:
        return {
            "EMBER_WORKER_ID": launch.worker_id,
            "EMBER_WORKER_SECRET": launch.secret,
            "EMBER_CONTROL": launch.control,
            "EMBER_BUNDLE": str(launch.bundle),
            "EMBER_APP": launch.app,
            "EMBER_UNIT": launch.unit,
            "EMBER_CONCURRENCY": str(launch.concurrency),
            "EMBER_SERVER_PID": str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
            **gpu_env(launch.gpus, launch.gpu_memory_mib),
            **launch.env,
        }

    async def prepare(
        self, bundle: Path, app: str, unit: str, secrets: dict[str, str] | None = None
    ) -> None:
        """Start the template of a function version, so that later workers fork from it.

        Its secrets are in its environment from the start, as they would be in a plainly started
        worker: the user's module may read them at import."""
        key = (str(bundle), unit)
        if not self.use_templates or key in self.templates:
            return
        workspace = bundle.parent.parent.parent.name
        env = {
            **base_env(),
            "EMBER_BUNDLE": str(bundle),
            "EMBER_APP": app,
            "EMBER_UNIT": unit,
            "EMBER_TEMPLATE_LOG": str(
                self.log_dir / f"template-{workspace}-{app}-{unit}-{bundle.parent.name}.log"
            ),
            "EMBER_SERVER_PID": str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
            **(secrets or {}),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ember.worker.template",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(bundle.parent),
            start_new_session=True,
        )
        self.templates[key] = Template(proc)

    def retire(self, bundle: Path, unit: str) -> None:
        template = self.templates.pop((str(bundle), unit), None)
        if template is not None:
            template.retire()

    async def close(self) -> None:
        """Stop every template (their workers are stopped before this) and wait for them."""
        templates, self.templates = list(self.templates.values()), {}
        for template in templates:
            template.close()
        for template in templates:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(template.proc.wait(), 5)

    async def start(self, launch: Launch) -> LocalProcess | ForkedProcess:
        env = self._env(launch)
        log_path = self.log_dir / f"{launch.worker_id}.log"
        template = self.templates.get((str(launch.bundle), launch.unit))
        if template is not None and not template.settled.is_set():
            # Started at deploy, it is usually ready by the first call; a little wait for it
            # beats a plain start, which costs more than the rest of its import.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(template.settled.wait(), TEMPLATE_WAIT_S)
        if template is not None and template.ready:
            try:
                return await template.fork(launch, env, log_path)
            except (TemplateError, TimeoutError, OSError) as exc:
                log.warning("template could not fork (%s); starting the worker plainly", exc)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ember.worker",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env={**base_env(), **env},
                cwd=str(launch.bundle.parent),
                start_new_session=True,
            )
        return LocalProcess(proc)
