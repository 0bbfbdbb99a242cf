"""Real `ember server` processes for tests: free ports, temporary data dirs, nothing left running.

The server itself is `ember.testing.LocalServer`; `Server` adds only what tests need. The helpers
are re-exported here, so `from conftest import Server, free_port, pid_alive, wait_for,
worker_pids` works in every test module.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

import ember
import pg
from ember.backends.sandbox import probe
from ember.store.db import URL_ENV, sqlite_url
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


for _name in URL_ENV:
    # A store URL in the environment would point every test server at one real database: each
    # test picks its own store (`store_url`, `pg_url`), and servers get it as --db.
    os.environ.pop(_name, None)


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

    @property
    def db_url(self) -> str:
        """The store this server runs on: its `--db`, else SQLite in its data dir."""
        args = self.extra_args
        return args[args.index("--db") + 1] if "--db" in args else sqlite_url(self.data_dir)


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


ALL_ON_POSTGRES = os.environ.get("EMBER_TEST_STORE") == "postgresql"
"""`EMBER_TEST_STORE=postgresql`: every server `make_server` starts without --db gets a new
PostgreSQL database of its own (tests that read SQLite's file themselves fail then)."""


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers on demand; each is stopped, and its workers checked gone, at teardown."""
    servers: list[Server] = []
    databases = ExitStack()

    def make(*extra_args: str, data_dir: Path | None = None) -> Server:
        args = list(extra_args)
        if NO_SANDBOX and "--sandbox" not in args:  # workspaces' code still runs, unisolated
            args.append("--no-tenant-isolation")
        if ALL_ON_POSTGRES and "--db" not in args:
            args += ["--db", databases.enter_context(pg.database())]
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
    databases.close()
    assert not leftovers, f"workers outlived their server: {leftovers}"


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty store: a SQLite file, and (a second run of the test) a new database
    on the machine's PostgreSQL (tests/pg.py: skipped where there is none, unless CI requires
    it). Ask for it before the fixtures that start servers on it: it is dropped after them."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
        return
    with pg.database() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new empty database on the machine's PostgreSQL, dropped after the test (ask for it
    before `make_server`, so that it outlives the servers)."""
    with pg.database() as url:
        yield url
