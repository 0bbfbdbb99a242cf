"""The server can die at any instant: accepted jobs survive, workers do not outlive it."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, wait_for, worker_pids
from ember.sdk.client import Client

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")

SOURCE = """
import os, time
import ember

app = ember.App("durable")

@app.function(max_workers=1)
def slow(i: int, delay: float) -> dict:
    time.sleep(delay)  # sleep-ok: the deployed function's simulated work
    return {"i": i, "pid": os.getpid()}

@app.function(max_workers=2)
def quick(i: int) -> int:
    return i * i

@app.function(min_workers=2)
def kept() -> int:
    return os.getpid()
"""

HOOKED = """
import os
import ember

app = ember.App("hooked")

@app.cls(min_workers=2)
class Model:
    @ember.enter()
    def load(self):
        pass

    @ember.method()
    def go(self) -> int:
        return os.getpid()

    @ember.exit()
    def bye(self):
        with open({log!r}, "a") as f:
            f.write(f"exit {{os.getpid()}}\\n")
"""


def status(server: Server, job_id: str) -> str:
    return str(server.client.get_job(job_id)["status"])


def ended(server: Server, ids: list[str]) -> Callable[[], dict[str, dict[str, Any]] | None]:
    def check() -> dict[str, dict[str, Any]] | None:
        bodies = {i: server.client.get_job(i) for i in ids}
        return bodies if all(b["status"] in TERMINAL for b in bodies.values()) else None

    return check


def test_kill9_loses_no_accepted_job(make_server: Callable[..., Server]) -> None:
    server = make_server()
    server.deploy(SOURCE)
    # one job running, four queued behind it (max_workers=1), plus a burst of quick ones
    running = server.client.run("durable", "slow", {"i": 0, "delay": 1.5})["id"]
    queued = [
        server.client.run("durable", "slow", {"i": i, "delay": 0.1})["id"] for i in range(1, 5)
    ]
    quick = [server.client.run("durable", "quick", {"i": i})["id"] for i in range(10)]
    wait_for(lambda: status(server, running) == "IN_PROGRESS", what="the slow job to run")
    assert all(status(server, q) == "IN_QUEUE" for q in queued)
    pids = worker_pids(server.data_dir)
    assert pids, "workers were running"

    server.kill9()
    # the workers notice their server is gone and exit by themselves
    wait_for(lambda: not worker_pids(server.data_dir), timeout=10, what="orphan workers to exit")
    # (not pid_alive: on a busy machine a freed pid may already belong to another process)
    assert not set(pids) & set(worker_pids(server.data_dir))

    server.start()  # same data dir, same port
    ids = [running, *queued, *quick]
    bodies = wait_for(ended(server, ids), timeout=40, what="every job to end")
    assert {i: b["status"] for i, b in bodies.items()} == dict.fromkeys(ids, "COMPLETED")
    assert [bodies[q]["output"]["i"] for q in [running, *queued]] == [0, 1, 2, 3, 4]
    assert [bodies[q]["output"] for q in quick] == [i * i for i in range(10)]
    for b in bodies.values():
        t = b["timings"]
        total = sum(t[k] for k in ("queue_ms", "cold_start_ms", "load_ms", "exec_ms", "post_ms"))
        assert abs(total - t["total_ms"]) < 0.01
    # and the restarted server keeps working
    assert server.function("durable", "quick").remote(7) == 49


def test_kill9_during_a_burst_of_submissions(make_server: Callable[..., Server]) -> None:
    """Whatever got its 202 survives, however close to the kill it was accepted."""
    server = make_server()
    server.deploy(SOURCE)
    accepted: list[str] = []
    client = Client(url=server.url, token=server.token)

    def submit() -> None:
        i = 0
        while True:
            try:
                accepted.append(client.run("durable", "quick", {"i": i})["id"])
            except Exception:
                return  # the server is gone
            i += 1

    submitter = threading.Thread(target=submit)
    submitter.start()
    wait_for(lambda: len(accepted) >= 30, what="a burst of accepted jobs")
    server.kill9()
    submitter.join(timeout=30)
    client.close()
    wait_for(lambda: not worker_pids(server.data_dir), timeout=10, what="orphan workers to exit")
    server.start()
    bodies = wait_for(ended(server, accepted), timeout=40, what="every accepted job to end")
    assert {b["status"] for b in bodies.values()} == {"COMPLETED"}
    assert all(b["output"] is not None for b in bodies.values())


def test_kill9_twice_in_a_row(make_server: Callable[..., Server]) -> None:
    """A crash during recovery is survived too."""
    server = make_server()
    server.deploy(SOURCE)
    ids = [server.client.run("durable", "slow", {"i": i, "delay": 0.3})["id"] for i in range(4)]
    wait_for(lambda: status(server, ids[0]) == "IN_PROGRESS", what="the first job to run")
    server.kill9()
    wait_for(lambda: not worker_pids(server.data_dir), timeout=10, what="orphan workers to exit")
    server.start()
    wait_for(
        lambda: any(status(server, i) == "IN_PROGRESS" for i in ids), what="a job to run again"
    )
    server.kill9()
    wait_for(lambda: not worker_pids(server.data_dir), timeout=10, what="orphan workers to exit")
    server.start()
    bodies = wait_for(ended(server, ids), timeout=40, what="every job to end")
    assert [b["status"] for b in bodies.values()] == ["COMPLETED"] * 4
    assert [bodies[i]["output"]["i"] for i in ids] == [0, 1, 2, 3]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_stops_every_worker(
    make_server: Callable[..., Server], tmp_path: Path, sig: int
) -> None:
    log = tmp_path / "exit.log"
    server = make_server()
    server.deploy(SOURCE)
    server.deploy(HOOKED.format(log=str(log)))
    wait_for(
        lambda: len([w for w in server.workers() if w["state"] == "IDLE"]) == 4,
        timeout=20,
        what="min_workers of both apps",
    )
    job_id = server.client.run("durable", "slow", {"i": 0, "delay": 0.5})["id"]
    wait_for(lambda: status(server, job_id) == "IN_PROGRESS", what="the job to run")
    assert len({w["pid"] for w in server.workers()}) == 5
    hooked = {w["pid"] for w in server.workers() if w["app"] == "hooked"}

    # a clean shutdown; uvicorn then re-raises the signal (or the CLI exits 128 + N)
    assert server.stop(sig) in (0, -sig, 128 + sig)
    # every worker is gone once the server has exited, and exit hooks ran on the way out
    assert not worker_pids(server.data_dir)
    exited = {int(line.split()[1]) for line in log.read_text().splitlines()}
    assert exited == hooked
    # the job running at SIGTERM was allowed to finish (or is picked up again on restart)
    server.start()
    body = wait_for(ended(server, [job_id]), timeout=20, what="the job to end")[job_id]
    assert body["status"] == "COMPLETED"


def test_restart_keeps_apps_deployed_and_callable(make_server: Callable[..., Server]) -> None:
    server = make_server()
    server.deploy(SOURCE)
    server.deploy(SOURCE + "\n# v2\n")
    assert server.function("durable", "quick").remote(3) == 9
    done = server.client.run("durable", "quick", {"i": 5})["id"]
    wait_for(lambda: status(server, done) == "COMPLETED", what="a job to complete")
    server.restart()
    apps = {a["name"]: a for a in server.client.list_apps()}
    assert apps["durable"]["version"] == 2
    assert [f["name"] for f in apps["durable"]["functions"]] == ["slow", "quick", "kept"]
    assert server.function("durable", "quick").remote(4) == 16
    # min_workers come back after a restart
    wait_for(
        lambda: len([w for w in server.workers() if w["unit"] == "kept"]) == 2,
        what="min_workers after restart",
    )
    # finished jobs are still there, with their output
    body = server.client.get_job(done)
    assert body["status"] == "COMPLETED" and body["output"] == 25
    # and the next deploy continues the version numbers
    assert server.deploy(SOURCE)["version"] == 3


STUCK = """
import asyncio, time
import ember

app = ember.App("stuck")

@app.cls(min_workers=1)
class Loading:
    @ember.enter()
    def load(self):
        time.sleep(600)  # sleep-ok: a deployed model that takes forever to load

    @ember.method()
    def go(self) -> int:
        return 1

@app.function()
async def blocking() -> None:
    time.sleep(600)  # sleep-ok: a deployed function that blocks its event loop
"""


def test_workers_busy_in_enter_or_blocking_code_exit_with_the_server(
    make_server: Callable[..., Server],
) -> None:
    server = make_server()
    server.deploy(STUCK)
    job_id = server.client.run("stuck", "blocking", {})["id"]
    wait_for(lambda: status(server, job_id) == "IN_PROGRESS", what="the blocking job to run")
    wait_for(lambda: len([w for w in server.workers() if w["pid"]]) == 2, what="both workers")
    server.kill9()
    wait_for(lambda: not worker_pids(server.data_dir), timeout=10, what="orphan workers to exit")
