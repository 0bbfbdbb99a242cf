"""Real `ember server` processes for tests: free ports, temporary data dirs, nothing left running.

The server itself is `ember.testing.LocalServer`; `Server` adds only what tests need. The helpers
are re-exported here, so `from conftest import Server, free_port, pid_alive, wait_for,
worker_pids` works in every test module.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import ember
from ember.backends.sandbox import probe
from ember.testing import LocalServer, WorkersOutlived, free_port, pid_alive, wait_for, worker_pids

__all__ = [
    "UNSANDBOXED",
    "Server",
    "free_port",
    "pid_alive",
    "result",
    "spawn",
    "wait_for",
    "worker_pids",
]


NO_SANDBOX = probe() is not None
"""No worker sandbox on this machine (bubblewrap missing): tests/test_sandbox.py skips, and the
other tests' servers run every workspace's code unsandboxed."""


UNSANDBOXED = ("--sandbox", "off")
"""For tests whose functions signal the test through files under its tmp_path, or report pids to
compare with the server's view: a sandboxed worker sees neither the host's files nor its pids.
Isolation itself is tested in tests/test_sandbox.py."""


class Server(LocalServer):
    """One `ember server` subprocess on a free port with its own data dir, plus test helpers."""

    def http(
        self, method: str, path: str, *, token: str | None = "default", **kw: Any
    ) -> httpx.Response:
        """A raw request, to check status codes and bodies the SDK would turn into exceptions;
        `token=None` sends none."""
        headers = dict(kw.pop("headers", {}))
        if token == "default":
            token = self.token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, self.url + path, headers=headers, timeout=60, **kw)

    def deploy(
        self, source: str, filename: str = "app_under_test.py", *, wait: bool = True
    ) -> dict[str, Any]:
        """Write `source` (dedented) next to the data dir and deploy it like `ember deploy`
        (`wait=False`: like `ember deploy --no-wait`)."""
        from ember.sdk.deploy import deploy_file

        path = self.data_dir.parent / filename
        path.write_text(textwrap.dedent(source))
        return deploy_file(path, client=self.client, wait=wait)[0]

    def function(self, app: str, name: str) -> ember.Function:
        return ember.Function.lookup(app, name, client=self.client)


def spawn(server: Server, app: str, fn: str, **input: Any) -> str:
    """Queue a job through the API; its id."""
    return str(server.client.run(app, fn, input)["id"])


def result(server: Server, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """The job's body once it has ended, however it ended."""

    def done() -> dict[str, Any] | None:
        body = server.client.get_job(job_id, wait=1)
        return body if body["status"] not in ("IN_QUEUE", "IN_PROGRESS") else None

    body: dict[str, Any] = wait_for(done, timeout=timeout, what=f"job {job_id} to end")
    return body


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers on demand; each is stopped, and its workers checked gone, at teardown."""
    servers: list[Server] = []

    def make(*extra_args: str, data_dir: Path | None = None) -> Server:
        args = list(extra_args)
        if NO_SANDBOX and "--sandbox" not in args:  # workspaces' code still runs, unisolated
            args.append("--no-tenant-isolation")
        server = Server(data_dir or tmp_path / f"data{len(servers)}", args)
        servers.append(server)
        return server.start()

    yield make
    leftovers: list[int] = []
    for server in servers:
        try:
            server.shutdown(timeout=15)
        except WorkersOutlived as exc:
            leftovers.extend(exc.pids)
    assert not leftovers, f"workers outlived their server: {leftovers}"


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()
