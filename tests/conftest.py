"""Real `ember server` processes for tests: free ports, temporary data dirs, nothing left running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import ember
from ember.sdk.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll until `predicate()` is truthy; return its value or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited; only its parent has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def worker_pids(data_dir: Path) -> list[int]:
    """Every live worker process started by a server on `data_dir` (found through /proc)."""
    marker = f"EMBER_BUNDLE={data_dir}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if marker in env and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


class Server:
    """One `ember server` subprocess on a free port with its own data dir."""

    def __init__(self, data_dir: Path, extra_args: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Client | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ember.cli.main",
                "server",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--log-level",
                "warning",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._healthy, timeout=30, what=f"ember server on {self.url}")
        self._client = None
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"ember server exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(self.url + "/v1/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def token(self) -> str:
        return (self.data_dir / "token").read_text().strip()

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(url=self.url, token=self.token)
        return self._client

    def http(
        self, method: str, path: str, *, token: str | None = "default", **kw: Any
    ) -> httpx.Response:
        """A raw request; `token=None` sends none."""
        headers = dict(kw.pop("headers", {}))
        if token == "default":
            token = self.token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kw)

    def deploy(self, source: str, filename: str = "app_under_test.py") -> dict[str, Any]:
        """Write `source` (dedented) next to the data dir and deploy it like `ember deploy`."""
        from ember.sdk.deploy import deploy_file

        path = self.data_dir.parent / filename
        path.write_text(textwrap.dedent(source))
        return deploy_file(path, client=self.client)[0]

    def function(self, app: str, name: str) -> ember.Function:
        return ember.Function.lookup(app, name, client=self.client)

    def workers(self) -> list[dict[str, Any]]:
        return self.client.request("GET", "/workers").json()["workers"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._client is not None:
            self._client.close()
            self._client = None
        return self.proc.returncode

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Server:
        self.stop()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        return self.start()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers on demand; each is stopped, and its workers checked gone, at teardown."""
    servers: list[Server] = []

    def make(*extra_args: str, data_dir: Path | None = None) -> Server:
        server = Server(data_dir or tmp_path / f"data{len(servers)}", list(extra_args))
        servers.append(server)
        return server.start()

    yield make
    leftovers = []
    for server in servers:
        server.stop()
        try:
            wait_for(
                lambda s=server: not worker_pids(s.data_dir), timeout=15, what="workers to exit"
            )
        except AssertionError:
            for pid in worker_pids(server.data_dir):
                leftovers.append(pid)
                os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"workers outlived their server: {leftovers}"


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()
