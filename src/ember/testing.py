"""Run a real `ember server` in a subprocess: for tests, demos and benchmarks.

The test suite, `make demo` and the benchmarks all need the same thing: an `ember server` on a
free port with its own data dir, started and waited for, stopped again, and a check that none of
its workers outlived it. This module is that, once.

    from ember.testing import LocalServer

    server = LocalServer(Path(tmp) / "data").start()
    try:
        ...  # server.url, server.token, server.client (an ember.sdk.client.Client)
    finally:
        server.shutdown()  # SIGTERM, then make sure no worker is left running

It is not imported by `import ember`; import it explicitly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx

from ember.sdk.client import Client

__all__ = [
    "LocalServer",
    "ServerExited",
    "WaitTimeout",
    "WorkersOutlived",
    "free_port",
    "pid_alive",
    "wait_for",
    "worker_pids",
]

T = TypeVar("T")

_HAS_PROC = os.path.isdir("/proc")


class WaitTimeout(AssertionError, TimeoutError):
    """`wait_for` gave up. An AssertionError, so that pytest shows it as a failed check, and a
    TimeoutError, so that scripts can catch it as the timeout it is."""


class ServerExited(RuntimeError):
    """The server process exited while it was being started; the message holds its log."""


class WorkersOutlived(RuntimeError):
    """Worker processes were still running after their server stopped (they are killed now)."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(f"workers outlived the server (killed now): {pids}")
        self.pids = pids


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True while `pid` runs. A zombie (exited, not yet reaped by its parent) counts as gone;
    without /proc (macOS) `kill(pid, 0)` is all there is to go by."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; it is someone else's
    if not _HAS_PROC:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ...": comm may itself hold ") ", so split at the last one.
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False  # it went away between the two looks


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll until `predicate()` is truthy and return its value; raise WaitTimeout (an
    AssertionError and a TimeoutError) naming `what` after `timeout` seconds. Polling, not
    sleeping a fixed time, keeps fast paths fast and slow machines correct."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def worker_pids(data_dir: Path) -> list[int]:
    """Every live process whose environment has EMBER_BUNDLE under `data_dir`: the workers (and
    worker templates) of a server on that data dir, whether or not the server still runs.
    Found through /proc, so always empty where there is none."""
    if not _HAS_PROC:
        return []
    roots = {str(data_dir), str(Path(data_dir).resolve())}
    prefixes = tuple(f"EMBER_BUNDLE={root}{os.sep}".encode() for root in roots)
    exact = {f"EMBER_BUNDLE={root}".encode() for root in roots}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if any(v in exact or v.startswith(prefixes) for v in env) and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


class LocalServer:
    """One `ember server` subprocess on a free port with its own data dir and a log file.

    `start()` and `restart()` wait until it answers /v1/health; `stop()` ends it (SIGTERM, then
    SIGKILL after `timeout`); `shutdown()` also checks that no worker outlived it. Subclass it
    to add what one caller needs (the tests' `Server` adds raw HTTP and deploys)."""

    def __init__(
        self,
        data_dir: Path,
        extra_args: Sequence[str] | None = None,
        *,
        log_path: Path | None = None,
        log_level: str = "warning",
    ) -> None:
        self.data_dir = data_dir
        self.extra_args = list(extra_args or [])
        self.log_level = log_level
        self.port = free_port()
        self.log_path = log_path or data_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_workers: set[int] = set()
        """Every worker pid `workers()` reported: what `shutdown()` checks where /proc is not."""
        self._client: Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The admin token the server wrote into its data dir on first start."""
        return (self.data_dir / "token").read_text().strip()

    @property
    def env(self) -> dict[str, str]:
        """The environment for a client process (`ember deploy ...`) of this server."""
        return {**os.environ, "EMBER_URL": self.url, "EMBER_DATA_DIR": str(self.data_dir)}

    @property
    def client(self) -> Client:
        """An SDK client for this server, made once per start (the port changes on restart)."""
        if self._client is None:
            self._client = Client(url=self.url, token=self.token)
        return self._client

    def command(self) -> list[str]:
        """The `ember server` command line this starts."""
        return [
            *(sys.executable, "-m", "ember.cli.main", "server"),
            *("--port", str(self.port), "--data-dir", str(self.data_dir)),
            *("--log-level", self.log_level),
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> Self:
        """Start the server and wait until it answers /v1/health; returns self, for chaining."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        self._close_client()
        wait_for(self._healthy, timeout=timeout, interval=0.02, what=f"ember server on {self.url}")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ServerExited(
                f"ember server exited with code {self.proc.returncode}; "
                f"its log ({self.log_path}):\n{self.log()[-20_000:]}"
            )
        try:
            return httpx.get(self.url + "/v1/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        """Everything the server wrote so far (all its starts, on one file)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def workers(self) -> list[dict[str, Any]]:
        """GET /v1/workers; each pid reported is remembered in `seen_workers`."""
        workers: list[dict[str, Any]] = self.client.request("GET", "/workers").json()["workers"]
        self.seen_workers.update(w["pid"] for w in workers if w.get("pid"))
        return workers

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send `sig` and wait for the exit, SIGKILL after `timeout` s. Returns the exit code
        (None if it was never started). Workers are not waited for: see `shutdown()`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_client()
        return self.proc.returncode

    def kill9(self) -> None:
        """A crash, as far as the server can tell: SIGKILL, no cleanup."""
        self.stop(signal.SIGKILL)

    def restart(self, timeout: float = 30.0) -> Self:
        """Stop, then start again on the same data dir and a new port."""
        self.stop()
        self.port = free_port()
        return self.start(timeout)

    def live_workers(self) -> list[int]:
        """The server's worker processes still running: /proc where there is one, otherwise
        those `workers()` ever reported that still run."""
        if _HAS_PROC:
            return worker_pids(self.data_dir)
        return sorted(p for p in self.seen_workers if pid_alive(p))

    def shutdown(self, timeout: float = 10.0) -> int | None:
        """`stop()` (SIGTERM), then wait up to `timeout` s for every worker to exit: workers
        that outlive their server are a bug. Any left is SIGKILLed and WorkersOutlived raised."""
        code = self.stop()
        try:
            wait_for(lambda: not self.live_workers(), timeout, 0.05, "workers to exit")
        except WaitTimeout:
            left = self.live_workers()
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if left:
                raise WorkersOutlived(left) from None
        return code

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
