"""The local backend: each worker is an OS process on this machine.

Workers run in the server's own Python environment, each template and each plainly started
worker in a sandbox of its own (`backends/sandbox.py`) where bubblewrap is there, in their own
process session (a Ctrl-C in the server's terminal reaches the server, which then stops them in
order), with their raw stdout/stderr in a per-worker file under the data dir (opened by the server
and handed over: the file itself is out of a sandbox's sight). Where a template of the function
version is ready, a worker is forked from it (milliseconds, the user's module already imported,
inside the template's sandbox); where none can serve (disabled, still starting, failed, crashed),
it is started as a new `python -m ember.worker` process, with the same behaviour.

A worker's secret for the control channel reaches it on its stdin (or in the fork request), never
in its environment or argv, which other processes may read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from ember.backends.base import Launch, Runtime
from ember.backends.sandbox import CONTROL_SOCKET, Sandbox
from ember.backends.templates import (
    ForkedProcess,
    LogSink,
    Template,
    TemplateError,
)
from ember.core.isolation import refusal
from ember.core.names import under
from ember.core.placement import Gpu
from ember.core.templates import to_stop

log = logging.getLogger("ember.backend")


SERVER_ONLY = (
    "EMBER_MASTER_KEY",
    "EMBER_TOKEN",
    "EMBER_DATABASE_URL",
    "EMBER_DB_URL",
    "PGPASSWORD",
)
"""Variables of the server's environment that user code must never see (the store's URL may
hold its password)."""


class Unisolated(RuntimeError):
    """Code of a workspace other than `default` on a server without a sandbox, not allowed."""


def base_env() -> dict[str, str]:
    """The server's environment without what is the server's alone (no sandbox: the operator
    chose to run user code as the server's user)."""
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


TEMPLATE_WAIT_S = 2.0
"""How long a worker start waits for its template to finish loading before starting plainly."""


class LocalBackend:
    """Workers as processes of this machine (see the module's docstring); a `Backend`."""

    name = "local"

    def __init__(
        self,
        log_dir: Path,
        *,
        templates: bool = True,
        inventory: tuple[Gpu, ...] = (),
        control_socket: Path | None = None,
        sandbox: Sandbox | None = None,
        isolated_only: bool = True,
    ) -> None:
        self.node = socket.gethostname()
        self.inventory = inventory
        self.log_dir = log_dir
        self.use_templates = templates
        self.control_socket = control_socket
        """The control channel's Unix socket: sandboxed workers reach the server only there."""
        self.sandbox = sandbox
        self.isolated_only = isolated_only
        """Without a sandbox, refuse the code of workspaces other than `default`."""
        self.templates: dict[tuple[str, str], Template] = {}
        self.checks: dict[tuple[str, str], Template] = {}
        """Check-only imports at deploy, where templates are off."""
        self.recipes: dict[tuple[str, str], Callable[[], Awaitable[None]]] = {}
        """How each served version's template is started (again, after an idle stop)."""
        self.dormant: dict[tuple[str, str], Callable[[], Awaitable[None]]] = {}
        """Templates stopped for idleness or memory, started again by the next worker start."""
        log_dir.mkdir(parents=True, exist_ok=True)

    def _check(self, workspace: str, block_network: bool) -> None:
        why = refusal(
            sandboxed=self.sandbox is not None,
            workspace=workspace,
            tenant_isolation=self.isolated_only,
            block_network=block_network,
        )
        if why is not None:
            raise Unisolated(why)

    def _control(self, launch: Launch) -> str:
        if self.sandbox is not None:
            return f"unix:{CONTROL_SOCKET}"
        if self.control_socket is not None:
            return f"unix:{self.control_socket}"
        return launch.control

    def _env(self, launch: Launch) -> dict[str, str]:
        return {
            "EMBER_WORKER_ID": launch.worker_id,
            "EMBER_CONTROL": self._control(launch),
            "EMBER_BUNDLE": str(launch.bundle),
            "EMBER_ROOT": str(launch.root or launch.bundle.parent),
            "EMBER_APP": launch.app,
            "EMBER_UNIT": launch.unit,
            "EMBER_CONCURRENCY": str(launch.concurrency),
            # in a sandbox the server's pid means nothing; its death takes the sandbox along
            "EMBER_SERVER_PID": "" if self.sandbox else str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
            **gpu_env(launch.gpus, launch.gpu_memory_mib),
            **launch.env,
        }

    def _command(
        self, module: str, root: Path, block_network: bool, runtime: Runtime | None
    ) -> list[str]:
        python = str(runtime.python) if runtime is not None else sys.executable
        argv = [python, "-m", module]
        if self.sandbox is None:
            return argv
        real_gpus = any(not g.simulated for g in self.inventory)
        return self.sandbox.wrap(
            argv,
            bundle_dir=root,
            block_network=block_network,
            gpus=real_gpus,
            python_paths=[str(p) for p in runtime.paths] if runtime is not None else None,
        )

    def _full_env(self, env: dict[str, str], runtime: Runtime | None = None) -> dict[str, str]:
        """A process's whole environment: the sandbox's (or, unsandboxed, the server's), the
        Env's variables, then the worker's own. In an Env, nothing of the server's Python
        (PYTHONPATH, its venv) reaches the process."""
        if runtime is not None:
            env = {**runtime.variables, **env, "VIRTUAL_ENV": str(runtime.python.parent.parent)}
        full = self.sandbox.env(env) if self.sandbox is not None else {**base_env(), **env}
        if runtime is not None:
            for k in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE"):
                full.pop(k, None)
            full["PATH"] = f"{runtime.python.parent}:{full.get('PATH', '/usr/bin:/bin')}"
        return full

    async def prepare(
        self,
        bundle: Path,
        app: str,
        unit: str,
        secrets: dict[str, str] | None = None,
        *,
        workspace: str = "default",
        block_network: bool = False,
        on_log: LogSink | None = None,
        runtime: Runtime | None = None,
        root: Path | None = None,
    ) -> None:
        """Start the template of a function version, so that later workers fork from it (with
        templates off: a check-only process that imports the code and exits).

        Its secrets are in its environment from the start, as they would be in a plainly started
        worker: the user's module may read them at import."""
        key = (str(bundle), unit)
        self.dormant.pop(key, None)
        if key in self.templates or key in self.checks:
            return
        self.recipes[key] = functools.partial(
            self.prepare,
            bundle,
            app,
            unit,
            secrets,
            workspace=workspace,
            block_network=block_network,
            on_log=on_log,
            runtime=runtime,
            root=root,
        )
        root = root or bundle.parent
        try:
            self._check(workspace, block_network)
        except Unisolated:
            return  # its workers' starts say why
        env = self._full_env(
            {
                "EMBER_BUNDLE": str(bundle),
                "EMBER_ROOT": str(root),
                "EMBER_APP": app,
                "EMBER_UNIT": unit,
                "EMBER_TEMPLATE": "1",
                "EMBER_TEMPLATE_CHECK": "" if self.use_templates else "1",
                "EMBER_SERVER_PID": "" if self.sandbox else str(os.getpid()),
                "PYTHONUNBUFFERED": "1",
                **(secrets or {}),
            },
            runtime,
        )
        log_path = under(self.log_dir, f"template-{workspace}-{app}-{unit}-{root.name}.log")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(5)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command("ember.worker.template", root, block_network, runtime),
                stdin=theirs.fileno(),
                stdout=asyncio.subprocess.PIPE,
                stderr=fd,
                env=env,
                cwd=str(root),
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(fd)
        template = Template(proc, ours, on_log, self.sandbox is not None)
        if self.use_templates:
            self.templates[key] = template
        else:
            self.checks[key] = template

    async def imported(self, bundle: Path, unit: str, timeout: float) -> str | None:
        key = (str(bundle), unit)
        template = self.templates.get(key) or self.checks.get(key)
        if template is None:
            return None  # none could start here (no sandbox for its workspace): starts say why
        try:
            await asyncio.wait_for(template.settled.wait(), timeout)
        except TimeoutError:
            log.warning("%s of %s still importing after %.0f s", unit, bundle, timeout)
            return None
        finally:
            if self.checks.pop(key, None) is not None:
                template.close()
        return None if template.loaded else (template.error or "the code failed to import")

    def sweep(self, idle_s: float, budget_bytes: int) -> list[tuple[str, str]]:
        """Stop the templates `core.templates.to_stop` picks; each starts again on demand."""
        facts = [t.facts(k) for k, t in self.templates.items() if t.ready and t.alive]
        stopped = []
        for key in to_stop(facts, idle_s, budget_bytes):
            assert isinstance(key, tuple)
            template = self.templates.pop(key)
            template.retire()
            if key in self.recipes:
                self.dormant[key] = self.recipes[key]
            stopped.append(key)
            log.info("stopped the idle template of %s (%s); it restarts on demand", key[1], key[0])
        return stopped

    def retire(self, bundle: Path, unit: str) -> None:
        self.dormant.pop((str(bundle), unit), None)
        self.recipes.pop((str(bundle), unit), None)
        check = self.checks.pop((str(bundle), unit), None)
        if check is not None:
            check.close()
        template = self.templates.pop((str(bundle), unit), None)
        if template is not None:
            template.retire()

    async def close(self) -> None:
        """Stop every template (their workers are stopped before this) and wait for them."""
        templates = [*self.templates.values(), *self.checks.values()]
        self.templates, self.checks = {}, {}
        for template in templates:
            template.close()
        for template in templates:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(template.proc.wait(), 5)

    async def start(self, launch: Launch) -> LocalProcess | ForkedProcess:
        self._check(launch.workspace, launch.block_network)
        env = self._env(launch)
        log_path = under(self.log_dir, f"{launch.worker_id}.log")
        key = (str(launch.bundle), launch.unit)
        if key in self.dormant:  # stopped for being idle: back on demand
            with contextlib.suppress(OSError):
                await self.dormant.pop(key)()
        template = self.templates.get(key)
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
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(
                    "ember.worker",
                    launch.root or launch.bundle.parent,
                    launch.block_network,
                    launch.runtime,
                ),
                stdin=asyncio.subprocess.PIPE,
                stdout=fd,
                stderr=fd,
                env=self._full_env(env, launch.runtime),
                cwd=str(launch.root or launch.bundle.parent),
                start_new_session=True,
            )
        finally:
            os.close(fd)
        assert proc.stdin is not None
        proc.stdin.write(launch.secret.encode() + b"\n")
        proc.stdin.close()
        return LocalProcess(proc)
