"""The server's side of a template (see `ember.worker.template`) and finding its forks.

A template reports its forks by the pids it sees; in a sandbox (its own PID namespace) those
differ from the server's, so the forks are found below the template's process by their
innermost pid. `backends/local.py` starts templates and asks them to fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.backends.base import Launch
from ember.core.templates import TemplateFacts

log = logging.getLogger("ember.backend")

LogSink = Callable[[list[list[Any]]], None]
"""Where a template's own output goes: `[job, stream, line, ts]` rows, already redacted."""


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


def _rss(pid: int) -> int:
    """Resident bytes of a process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


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
        self.error: str | None = None
        """Why it failed to load the code: the user's traceback."""
        self.loaded = False
        """It imported the code (it stays True once the process has exited: a check-only one
        exits at once)."""
        self.last_used = time.monotonic()
        """When it last forked (or started): an idle template stops (`core.templates`)."""
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
                self.ready = self.loaded = True
                self.settled.set()
            elif t == "failed":
                log.warning("template failed, workers will be started plainly: %s", msg["error"])
                self.error = msg.get("traceback") or msg["error"]
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
        if not self.ready and self.error is None and not self.settled.is_set():
            self.error = f"the process loading the code exited ({await self.proc.wait()})"
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
        self.last_used = time.monotonic()
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

    def facts(self, key: tuple[str, str]) -> TemplateFacts:
        return TemplateFacts(
            key, _rss(self.pid), time.monotonic() - self.last_used, len(self._exits)
        )

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
