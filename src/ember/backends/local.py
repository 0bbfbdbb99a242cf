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
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.backends.base import Launch
from ember.backends.sandbox import CONTROL_SOCKET, Sandbox
from ember.core.isolation import refusal
from ember.core.names import under
from ember.core.placement import Gpu

log = logging.getLogger("ember.backend")


SERVER_ONLY = ("EMBER_MASTER_KEY", "EMBER_TOKEN")
"""Variables of the server's environment that user code must never see."""

LogSink = Callable[[list[list[Any]]], None]
"""Where a template's own output goes: `[job, stream, line, ts]` rows, already redacted."""


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


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _ns_pid(pid: int) -> int | None:
    """The pid of `pid` in its innermost PID namespace."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return None


def outer_pid(root: int, inner: int, depth: int = 4) -> int | None:
    """The pid, as this server sees it, of the process below `root` (at most `depth` levels)
    that is `inner` inside its sandbox's PID namespace: a template reports pids as it sees them."""
    level = [root]
    for _ in range(depth):
        level = [c for pid in level for c in _children(pid)]
        for pid in level:
            if _ns_pid(pid) == inner:
                return pid
    return None


class Template:
    """The server's side of one template process (see `ember.worker.template`)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        requests: socket.socket,
        on_log: LogSink | None,
        sandboxed: bool,
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        """The template's own process (in a sandbox, bubblewrap's processes are above it)."""
        self.sandboxed = sandboxed
        self.requests = requests
        """Fork requests go out here, each with the new worker's log file as an fd."""
        self.on_log = on_log
        self.ready = False
        self.settled = asyncio.Event()
        """Set once the template is ready, has failed, or has exited."""
        self.retiring = False
        self._forks: dict[str, asyncio.Future[int]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        """By the pid the template reports (its own namespace's)."""
        self._outer: dict[int, int] = {}
        """Those pids as the server sees them, where a sandbox makes them differ."""
        self._reader = asyncio.ensure_future(self._read())

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        while line := await self.proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            t = msg.get("t")
            if t == "ready":
                if self.sandboxed:  # its forks are its children: find it once
                    self.pid = outer_pid(self.proc.pid, msg.get("pid", -1)) or self.proc.pid
                self.ready = True
                self.settled.set()
            elif t == "failed":
                log.warning("template failed, workers will be started plainly: %s", msg["error"])
                self.settled.set()
            elif t == "log" and self.on_log is not None:
                self.on_log(msg["lines"])
            elif t == "forked" and (fut := self._forks.pop(msg["worker"], None)):
                self._exits[msg["pid"]] = loop.create_future()
                fut.set_result(msg["pid"])
            elif t == "exited" and (done := self._exits.pop(msg["pid"], None)):
                self._outer.pop(msg["pid"], None)
                done.set_result(msg["code"])
                self._retire_if_done()
        self.ready = False
        self.settled.set()
        self.requests.close()
        for fut in self._forks.values():
            fut.set_exception(TemplateError("the template exited"))
        self._forks.clear()
        # Its workers outlive it (they watch the server, not the template): poll for their end.
        while self._exits:
            await asyncio.sleep(0.05)
            for pid in [p for p in self._exits if _gone(self._outer.get(p, p))]:
                self._exits.pop(pid).set_result(-1)

    async def fork(self, launch: Launch, env: dict[str, str], log_path: Path) -> ForkedProcess:
        if not (self.ready and self.alive) or self.retiring:
            raise TemplateError("no template ready")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._forks[launch.worker_id] = fut
        request = {"worker": launch.worker_id, "secret": launch.secret, "env": env}
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            socket.send_fds(self.requests, [json.dumps(request).encode() + b"\n"], [fd])
        finally:
            os.close(fd)
        inner = await asyncio.wait_for(fut, 10)
        pid = inner
        if self.sandboxed:
            found = outer_pid(self.pid, inner, depth=1)
            if found is None:
                raise TemplateError(f"cannot find the forked worker {inner} of the template")
            pid = self._outer[inner] = found
        return ForkedProcess(pid, self._exits[inner])

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
            "EMBER_APP": launch.app,
            "EMBER_UNIT": launch.unit,
            "EMBER_CONCURRENCY": str(launch.concurrency),
            # in a sandbox the server's pid means nothing; its death takes the sandbox along
            "EMBER_SERVER_PID": "" if self.sandbox else str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
            **gpu_env(launch.gpus, launch.gpu_memory_mib),
            **launch.env,
        }

    def _command(self, module: str, bundle: Path, block_network: bool) -> list[str]:
        argv = [sys.executable, "-m", module]
        if self.sandbox is None:
            return argv
        real_gpus = any(not g.simulated for g in self.inventory)
        return self.sandbox.wrap(
            argv, bundle_dir=bundle.parent, block_network=block_network, gpus=real_gpus
        )

    def _full_env(self, env: dict[str, str]) -> dict[str, str]:
        return self.sandbox.env(env) if self.sandbox is not None else {**base_env(), **env}

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
    ) -> None:
        """Start the template of a function version, so that later workers fork from it.

        Its secrets are in its environment from the start, as they would be in a plainly started
        worker: the user's module may read them at import."""
        key = (str(bundle), unit)
        if not self.use_templates or key in self.templates:
            return
        try:
            self._check(workspace, block_network)
        except Unisolated:
            return  # its workers' starts say why
        env = self._full_env(
            {
                "EMBER_BUNDLE": str(bundle),
                "EMBER_APP": app,
                "EMBER_UNIT": unit,
                "EMBER_TEMPLATE": "1",
                "EMBER_SERVER_PID": "" if self.sandbox else str(os.getpid()),
                "PYTHONUNBUFFERED": "1",
                **(secrets or {}),
            }
        )
        log_path = under(
            self.log_dir, f"template-{workspace}-{app}-{unit}-{bundle.parent.name}.log"
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.settimeout(5)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command("ember.worker.template", bundle, block_network),
                stdin=theirs.fileno(),
                stdout=asyncio.subprocess.PIPE,
                stderr=fd,
                env=env,
                cwd=str(bundle.parent),
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(fd)
        self.templates[key] = Template(proc, ours, on_log, self.sandbox is not None)

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
        self._check(launch.workspace, launch.block_network)
        env = self._env(launch)
        log_path = under(self.log_dir, f"{launch.worker_id}.log")
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
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command("ember.worker", launch.bundle, launch.block_network),
                stdin=asyncio.subprocess.PIPE,
                stdout=fd,
                stderr=fd,
                env=self._full_env(env),
                cwd=str(launch.bundle.parent),
                start_new_session=True,
            )
        finally:
            os.close(fd)
        assert proc.stdin is not None
        proc.stdin.write(launch.secret.encode() + b"\n")
        proc.stdin.close()
        return LocalProcess(proc)
