"""The server can die at any instant: accepted jobs survive, workers do not outlive it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import pg
from conftest import Server, result, spawn, wait_for, worker_pids
from ember.config import DEFAULT_MAX_PAYLOAD
from ember.errors import EmberError
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


def submitters(
    server: Server, app: str, fn: str, threads: int
) -> tuple[dict[str, int], threading.Event, list[threading.Thread]]:
    """`threads` clients submitting `{"i": n}` back to back until `stop` is set or the server is
    gone; `accepted` maps the id of every job that got its 202 to its `i`."""
    accepted: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def submit(k: int) -> None:
        client = Client(url=server.url, token=server.token)
        i = k * 1_000_000
        try:
            while not stop.is_set():
                try:
                    job_id = client.run(app, fn, {"i": i})["id"]
                except EmberError:
                    return  # the server is gone
                with lock:
                    accepted[job_id] = i
                i += 1
        finally:
            client.close()

    pool = [threading.Thread(target=submit, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    return accepted, stop, pool


@pytest.fixture(params=["normal", "full", "postgresql"])
def durable_store(request: pytest.FixtureRequest) -> Iterator[tuple[list[str], str]]:
    """The server flags of a store, and the line its server prints about it: SQLite with either
    `--durability`, and PostgreSQL (a database of its own, tests/pg.py). Ask for it before
    `make_server`, so that the database outlives the server."""
    if request.param == "postgresql":
        with pg.database() as url:
            yield ["--db", url], "store: postgresql+psycopg://"
    else:
        yield ["--durability", request.param], f"durability: {request.param}"


def test_kill9_under_sustained_load_loses_no_accepted_job(
    durable_store: tuple[list[str], str], make_server: Callable[..., Server]
) -> None:
    """Four clients submit back to back while the server is killed: whatever got its 202
    survives, however close to the kill it was accepted, and runs once more to completion."""
    flags, line = durable_store
    server = make_server(*flags)
    assert line in server.log()
    server.deploy(SOURCE)
    accepted, stop, threads = submitters(server, "durable", "quick", threads=4)
    wait_for(lambda: len(accepted) >= 200, timeout=30, what="a stream of accepted jobs")
    assert worker_pids(server.data_dir), "jobs were running when the server was killed"
    server.kill9()  # the clients are still submitting
    for t in threads:
        t.join(timeout=30)
    stop.set()
    wait_for(lambda: not worker_pids(server.data_dir), timeout=10, what="orphan workers to exit")
    server.start()
    bodies = wait_for(ended(server, list(accepted)), timeout=60, what="every accepted job to end")
    assert {b["status"] for b in bodies.values()} == {"COMPLETED"}
    assert {i: b["output"] for i, b in bodies.items()} == {i: n * n for i, n in accepted.items()}


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
    # the exit hooks write their pids to a file of the test's: outside any sandbox's sight, and
    # a sandboxed worker's pid is its PID namespace's, so this one runs without the sandbox
    server = make_server("--sandbox", "off")
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


# ------------------------------------------------------------------------- kill storms
STORM = """
import time
import ember

app = ember.App("storm")

@app.function(max_workers=3, retries=3)
def sturdy(i: int) -> int:
    time.sleep(0.1)  # sleep-ok: the deployed function's simulated work
    return i

@app.function(max_workers=2)
def fragile(i: int) -> int:
    time.sleep(0.1)  # sleep-ok: the deployed function's simulated work
    return i
"""


def _stat(pid: int) -> tuple[int, str]:
    """(parent pid, command line) of a process; (0, "") once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(") ", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return ppid, f.read().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError, ValueError):
        return 0, ""


def templates_and_workers(server: Server) -> tuple[list[int], list[int]]:
    """The server's template processes and its worker processes, now. A template runs
    `ember.worker.template` and is the server's child (or grandchild, under a sandbox's
    launcher); the workers it forks run that command line too, as its children, or as orphans
    once it is gone; the rest are workers started as new processes."""
    assert server.proc is not None
    tag = "ember.worker.template"
    templates, workers = [], []
    for pid in worker_pids(server.data_dir):
        ppid, cmd = _stat(pid)
        parent_ppid, parent_cmd = _stat(ppid)
        if tag in cmd and tag not in parent_cmd and server.proc.pid in (ppid, parent_ppid):
            templates.append(pid)
        elif "ember.worker" in cmd:
            workers.append(pid)
    return templates, sorted(workers)


def in_flight(server: Server, app: str, fns: tuple[str, ...]) -> int:
    """Jobs of `fns` queued or running, by the functions' health."""
    total = 0
    for fn in fns:
        jobs = server.client.request("GET", f"/apps/{app}/{fn}/health").json()["jobs"]
        total += jobs["in_queue"] + jobs["in_progress"]
    return total


def storm_ok(body: dict[str, Any], i: int) -> bool:
    """A job that went through a kill storm: completed with its own output, or failed with the
    reason its worker gave out."""
    if body["status"] == "COMPLETED":
        return bool(body["output"] == i)
    error = body["error"] or {}
    return (
        body["status"] == "FAILED"
        and error.get("type") == "WorkerExited"
        and ("worker exited" in error.get("message", ""))
    )


def test_kill_storm_of_workers_and_templates(make_server: Callable[..., Server]) -> None:
    """Busy workers and templates are killed (-9) over and over while jobs run: every job
    ends, completed with its output, retried, or failed with the reason; the server serves on."""
    server = make_server()
    server.deploy(STORM)
    inputs = {spawn(server, "storm", fn, i=i): i for i in range(40) for fn in ("sturdy", "fragile")}
    kills = Counter[str]()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and in_flight(server, "storm", ("sturdy", "fragile")):
        templates, _ = templates_and_workers(server)
        busy = [w["pid"] for w in server.workers() if w["state"] == "BUSY" and w["pid"]]
        for kind, pids in (("template", templates[:1]), ("worker", busy[:1])):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    kills[kind] += 1
        time.sleep(0.2)  # sleep-ok: the storm's pace
    assert kills["worker"] >= 5 and kills["template"] >= 1, kills
    # well before any idle_timeout or job timeout: a dead worker is noticed, whatever its template
    bodies = wait_for(ended(server, list(inputs)), timeout=30, what="every job to end")
    bad = {j: b for j, b in bodies.items() if not storm_ok(b, inputs[j])}
    assert not bad, bad
    statuses = Counter(b["status"] for b in bodies.values())
    # `attempts` counts the failed ones: a job completed after a kill has one or more
    retried = [b for b in bodies.values() if b["attempts"] > 0 and b["status"] == "COMPLETED"]
    assert retried, f"no job was retried after a kill: {statuses}, kills {dict(kills)}"
    # and the server serves on: new workers come up (plainly, where the template is gone)
    assert server.function("storm", "sturdy").remote(7) == 7
    assert server.function("storm", "fragile").remote(8) == 8


# ------------------------------------------------------------------------- a deep queue
HELD = """
import time
import ember

app = ember.App("deep")

@app.function(max_workers=1)
def held(i: int, hold: float = 0.0) -> int:
    time.sleep(hold)  # sleep-ok: the first job holds the only worker while the queue fills
    return i
"""

DEEP = 5_000


def stored_jobs(server: Server) -> dict[str, tuple[str, Any]]:
    """Every job row in the server's store: id -> (status, output), read from SQLite."""
    uri = f"file:{server.data_dir / 'ember.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute("SELECT id, status, output FROM jobs").fetchall()
    return {i: (s, None if o is None else json.loads(o)) for i, s, o in rows}


def test_a_deep_queue_survives_a_kill_and_drains(make_server: Callable[..., Server]) -> None:
    server = make_server()
    server.deploy(HELD)
    gate = server.client.run("deep", "held", {"i": -1, "hold": 600})["id"]
    wait_for(lambda: status(server, gate) == "IN_PROGRESS", what="the gate job to hold the worker")
    with ThreadPoolExecutor(4) as pool:
        ids = list(
            pool.map(lambda i: server.client.run("deep", "held", {"i": i})["id"], range(DEEP))
        )
    health = server.client.request("GET", "/apps/deep/held/health").json()["jobs"]
    assert health["in_queue"] == DEEP, health
    server.kill9()
    wait_for(lambda: not worker_pids(server.data_dir), timeout=10, what="orphan workers to exit")
    server.start()
    server.client.cancel(gate)  # the gate would hold the worker again
    wait_for(
        lambda: (
            server.client.request("GET", "/apps/deep/held/health").json()["jobs"]["completed"]
            == DEEP
        ),
        timeout=120,
        interval=0.5,
        what=f"{DEEP} queued jobs to complete after the restart",
    )
    rows = stored_jobs(server)
    assert rows[gate][0] == "CANCELLED"
    assert {i: rows[i] for i in ids} == {i: ("COMPLETED", n) for n, i in enumerate(ids)}


# ------------------------------------------------------------------------- large inputs
ECHO = """
import ember

app = ember.App("big")

@app.function()
def size(blob: str) -> int:
    return len(blob)
"""


def test_inputs_near_the_payload_limit_run_and_over_it_are_refused(
    make_server: Callable[..., Server],
) -> None:
    limit = DEFAULT_MAX_PAYLOAD
    server = make_server()
    server.deploy(ECHO)
    near = limit - 64  # the body is {"input": {"blob": "..."}}: 24 bytes around the blob
    job = server.client.run("big", "size", {"blob": "x" * near})["id"]
    assert result(server, job)["output"] == near
    before = set(stored_jobs(server))

    over = json.dumps({"input": {"blob": "x" * limit}}).encode()
    resp = server.http("POST", "/v1/apps/big/size/run", content=over)
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert error["code"] == "payload_too_large"
    assert "--max-payload" in error["message"] and str(limit) in error["message"]
    # the same without a Content-Length (chunked): refused once the limit is crossed
    chunks = (over[i : i + 2**20] for i in range(0, len(over), 2**20))
    resp = server.http("POST", "/v1/apps/big/size/run", content=chunks)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "payload_too_large"
    # nothing was stored, and the server answers on
    assert set(stored_jobs(server)) == before
    assert server.function("big", "size").remote("abc") == 3
