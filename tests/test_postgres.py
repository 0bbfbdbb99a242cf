"""`ember server --db postgresql+psycopg://...`: real servers on the machine's PostgreSQL (a new
database per test, tests/pg.py), real workers, nothing mocked. Jobs run, and an accepted one is
in the database: found again by a restarted server, run by it if a kill -9 cut it short. The
URL may come from EMBER_DATABASE_URL (which no user code sees); a database out of reach stops
the server with a message. Tests ask for `pg_url` before `make_server`: the database is dropped
after the servers stop.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from conftest import UNSANDBOXED, Server, free_port, result, spawn, wait_for, worker_pids
from ember.store import tables
from ember.store.db import make_engine

SOURCE = """
import os
import time

import ember

app = ember.App("pg")


@app.function()
def square(x: int) -> int:
    return x * x


@app.function(max_workers=1)
def slow(i: int, delay: float) -> int:
    time.sleep(delay)  # sleep-ok: the deployed function's simulated work
    return i


@app.function()
def sees(name: str) -> bool:
    return name in os.environ
"""


def jobs_in(url: str) -> dict[str, str]:
    """Job id -> status, as PostgreSQL holds them."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {
                r.id: r.status for r in conn.execute(select(tables.jobs.c.id, tables.jobs.c.status))
            }
    finally:
        engine.dispose()


def test_jobs_on_postgresql_survive_a_restart_and_a_kill(
    pg_url: str, make_server: Callable[..., Server]
) -> None:
    server = make_server("--db", pg_url)
    assert "store: postgresql+psycopg://" in server.log()
    server.deploy(SOURCE)
    assert server.client.runsync("pg", "square", {"x": 7})["output"] == 49
    done = spawn(server, "pg", "square", x=9)
    assert result(server, done)["output"] == 81

    # accepted, then the server is killed with them queued behind a slow one
    queued = [spawn(server, "pg", "slow", i=i, delay=0.2) for i in range(4)]
    assert set(queued) <= set(jobs_in(pg_url))  # a 202 means the row is committed
    server.kill9()
    wait_for(lambda: not worker_pids(server.data_dir), timeout=15, what="orphans to exit")
    server.restart()
    body = server.http("GET", f"/v1/jobs/{done}").json()
    assert (body["status"], body["output"]) == ("COMPLETED", 81)
    assert [result(server, job)["output"] for job in queued] == [0, 1, 2, 3]

    # a clean restart: the app is still deployed, every job still there, nothing in SQLite
    server.restart()
    assert server.client.runsync("pg", "square", {"x": 3})["output"] == 9
    stored = jobs_in(pg_url)
    assert {done, *queued} <= set(stored)
    assert all(stored[j] == "COMPLETED" for j in (done, *queued))
    assert not (server.data_dir / "ember.db").exists()


def test_the_database_url_may_come_from_the_environment(
    pg_url: str, make_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBER_DATABASE_URL", pg_url)
    server = make_server(*UNSANDBOXED)  # no --db: the server inherits the environment
    server.deploy(SOURCE)
    out = server.client.runsync("pg", "square", {"x": 5})
    assert out["output"] == 25 and out["id"] in jobs_in(pg_url)
    # the URL may hold the database's password: user code never sees it, even unsandboxed
    sees = server.client.runsync("pg", "sees", {"name": "EMBER_DATABASE_URL"})
    assert sees["output"] is False
    assert not (server.data_dir / "ember.db").exists()
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(tables.apps)).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("via", ["--db", "EMBER_DATABASE_URL"])
def test_a_database_out_of_reach_stops_the_server_with_what_to_fix(
    tmp_path: Path, via: str
) -> None:
    url = f"postgresql+psycopg://ember:secret@127.0.0.1:{free_port()}/ember"
    command = [sys.executable, "-m", "ember.cli.main", "server", "--data-dir", str(tmp_path)]
    command += ["--port", str(free_port())]
    env = None
    if via == "--db":
        command += ["--db", url]
    else:
        env = {**os.environ, "EMBER_DATABASE_URL": url}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert "cannot connect to the database" in message and "Connection refused" in message
    assert "Traceback" not in done.stderr and "secret" not in done.stderr  # password hidden
    assert "--db or EMBER_DATABASE_URL" in message
