"""Workers against a real server: processes, threads and tasks, hooks, scaling, redeploys, logs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import conftest
from conftest import UNSANDBOXED, Server, pid_alive, spawn, wait_for

TERMS = ("queue_ms", "cold_start_ms", "load_ms", "exec_ms", "post_ms")


def check_timings(body: dict[str, Any]) -> dict[str, float]:
    t = body["timings"]
    assert t is not None, body
    assert all(t[k] >= 0 for k in (*TERMS, "total_ms")), t
    assert abs(sum(t[k] for k in TERMS) - t["total_ms"]) < 0.01, t
    return t


def run(server: Server, app: str, fn: str, **input: Any) -> dict[str, Any]:
    """A `/runsync` call; returns the whole job body."""
    body = server.client.runsync(app, fn, input)
    check_timings(body)
    return body


def result(server: Server, job_id: str, timeout: float = 30) -> dict[str, Any]:
    """The ended job's body, its timings checked."""
    body = conftest.result(server, job_id, timeout)
    check_timings(body)
    return body


def live(server: Server, app: str) -> list[dict[str, Any]]:
    return [w for w in server.workers() if w["app"] == app and w["state"] != "DRAINING"]


PARALLEL = """
import asyncio, os, threading, time
import ember

app = ember.App("par")

@app.function(concurrency=4, max_workers=1)
def sleepy(delay: float) -> dict:
    t0 = time.time()
    time.sleep(delay)
    return {"pid": os.getpid(), "thread": threading.get_ident(), "start": t0, "end": time.time(),
            "main": threading.current_thread() is threading.main_thread()}

@app.function(concurrency=4, max_workers=1)
async def napping(delay: float) -> dict:
    t0 = time.time()
    await asyncio.sleep(delay)
    return {"pid": os.getpid(), "thread": threading.get_ident(), "start": t0, "end": time.time(),
            "main": threading.current_thread() is threading.main_thread()}

@app.function()
def pid() -> int:
    return os.getpid()
"""


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    """Its functions report pids and write files the tests read: no sandbox."""
    return make_server(*UNSANDBOXED)


def test_each_worker_is_its_own_process(server: Server) -> None:
    server.deploy(PARALLEL)
    body = run(server, "par", "pid")
    assert body["status"] == "COMPLETED"
    pid = body["output"]
    assert pid != server.proc.pid and pid_alive(pid)  # type: ignore[union-attr]
    [w] = live(server, "par")
    assert w["pid"] == pid and w["unit"] == "pid" and w["version"] == 1


def overlapping(outputs: list[dict[str, Any]]) -> bool:
    """Every run overlaps every other in time."""
    return max(o["start"] for o in outputs) < min(o["end"] for o in outputs)


def test_sync_code_runs_in_threads_of_one_worker(server: Server) -> None:
    server.deploy(PARALLEL)
    assert run(server, "par", "sleepy", delay=0)["status"] == "COMPLETED"  # warm it up
    t0 = time.monotonic()
    ids = [spawn(server, "par", "sleepy", delay=0.5) for _ in range(4)]
    outs = [result(server, i)["output"] for i in ids]
    elapsed = time.monotonic() - t0
    assert elapsed < 1.9, f"4 jobs of 0.5 s on 4 slots took {elapsed:.2f} s"
    assert len({o["pid"] for o in outs}) == 1, "one worker served them all"
    assert len({o["thread"] for o in outs}) == 4, "each in its own thread"
    assert not any(o["main"] for o in outs)
    assert overlapping(outs)
    assert len(live(server, "par")) == 1


def test_async_code_runs_as_tasks_on_one_loop(server: Server) -> None:
    server.deploy(PARALLEL)
    assert run(server, "par", "napping", delay=0)["status"] == "COMPLETED"
    t0 = time.monotonic()
    ids = [spawn(server, "par", "napping", delay=0.5) for _ in range(4)]
    outs = [result(server, i)["output"] for i in ids]
    assert time.monotonic() - t0 < 1.9
    assert len({o["pid"] for o in outs}) == 1
    assert len({o["thread"] for o in outs}) == 1 and all(o["main"] for o in outs)
    assert overlapping(outs)


HOOKS = """
import os
import ember

app = ember.App("hooks")
LOG = {log!r}

def note(what):
    with open(LOG, "a") as f:
        f.write(f"{{what}} {{os.getpid()}}\\n")

@app.cls(idle_timeout={idle_timeout}, max_workers=1)
class Model:
    @ember.enter()
    def load(self):
        note("enter")
        self.weights = 42

    @ember.method()
    def predict(self, x: int) -> int:
        note("call")
        return x + self.weights

    @ember.exit()
    def unload(self):
        note("exit")
"""


def events(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(a, int(b)) for a, b in (line.split() for line in path.read_text().splitlines())]


def test_cls_enter_runs_once_before_the_first_job_and_exit_on_drain(
    server: Server, tmp_path: Path
) -> None:
    log = tmp_path / "hooks.log"
    server.deploy(HOOKS.format(log=str(log), idle_timeout=1))
    predict = server.function("hooks", "Model.predict")
    assert [predict.remote(i) for i in range(3)] == [42, 43, 44]
    [w] = live(server, "hooks")
    pid = w["pid"]
    assert events(log) == [("enter", pid)] + [("call", pid)] * 3
    # idle for idle_timeout: the worker drains, running its exit hook, and exits
    wait_for(lambda: not pid_alive(pid), timeout=15, what="the idle worker to exit")
    assert events(log)[-1] == ("exit", pid)
    assert [e for e, _ in events(log)].count("enter") == 1


def test_exit_hooks_run_when_a_redeploy_drains_the_worker(server: Server, tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    source = HOOKS.format(log=str(log), idle_timeout=60)
    server.deploy(source)
    assert server.function("hooks", "Model.predict").remote(1) == 43
    [w] = live(server, "hooks")
    server.deploy(source + "\n# v2\n")
    wait_for(lambda: not pid_alive(w["pid"]), timeout=15, what="the old worker to exit")
    assert events(log) == [("enter", w["pid"]), ("call", w["pid"]), ("exit", w["pid"])]


SCALE = """
import os, time
import ember

app = ember.App("scale")

@app.function(max_workers=3)
def work(delay: float) -> dict:
    t0 = time.time()
    time.sleep(delay)
    return {"pid": os.getpid(), "start": t0, "end": time.time()}

@app.function(max_workers=2, concurrency=2)
def pair(delay: float) -> dict:
    t0 = time.time()
    time.sleep(delay)
    return {"pid": os.getpid(), "start": t0, "end": time.time()}

@app.function(buffer_workers=1, max_workers=3)
def buffered(delay: float = 0) -> int:
    time.sleep(delay)
    return os.getpid()

@app.function(min_workers=2, idle_timeout=1)
def kept() -> int:
    return os.getpid()

@app.function(idle_timeout=1)
def brief() -> int:
    return os.getpid()
"""


def test_a_call_with_no_worker_starts_one(server: Server) -> None:
    server.deploy(SCALE)
    assert not [w for w in server.workers() if w["unit"] == "brief"]
    body = run(server, "scale", "brief")
    assert body["status"] == "COMPLETED"
    assert body["timings"]["cold_start_ms"] > 0


def test_load_scales_out_to_max_workers_and_never_beyond(server: Server) -> None:
    server.deploy(SCALE)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(len([w for w in server.workers() if w["unit"] == "work"]))
            time.sleep(0.01)  # sleep-ok: sampling interval of the watcher thread

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        ids = [spawn(server, "scale", "work", delay=0.6) for _ in range(9)]
        outs = [result(server, i)["output"] for i in ids]
    finally:
        stop.set()
        watcher.join()
    assert max(seen) == 3, f"worker counts seen: {sorted(set(seen))}"
    assert len({o["pid"] for o in outs}) == 3
    # at no instant did more than 3 jobs run at once
    assert peak_overlap(outs) == 3


def peak_overlap(outs: list[dict[str, Any]]) -> int:
    points = sorted([(o["end"], -1) for o in outs] + [(o["start"], 1) for o in outs])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


def test_max_workers_times_concurrency_bounds_parallel_jobs(server: Server) -> None:
    server.deploy(SCALE)
    ids = [spawn(server, "scale", "pair", delay=0.5) for _ in range(8)]
    outs = [result(server, i)["output"] for i in ids]
    assert len({o["pid"] for o in outs}) == 2
    assert peak_overlap(outs) == 4


def test_buffer_workers_keep_a_spare_warm(server: Server) -> None:
    server.deploy(SCALE)
    [spare] = wait_for(
        lambda: [w for w in server.workers() if w["unit"] == "buffered" and w["state"] == "IDLE"],
        what="the buffer worker",
    )
    body = run(server, "scale", "buffered")
    assert body["output"] == spare["pid"] and body["timings"]["cold_start_ms"] == 0
    # with one job in flight, one more worker is kept in reserve
    job_id = spawn(server, "scale", "buffered", delay=1.0)
    ws = wait_for(
        lambda: (
            (ws := [w for w in server.workers() if w["unit"] == "buffered"])
            and sorted(w["state"] for w in ws) == ["BUSY", "IDLE"]
            and ws
        ),
        what="a busy worker and a spare",
    )
    assert {w["pid"] for w in ws if w["state"] == "BUSY"} == {spare["pid"]}
    assert result(server, job_id)["output"] == spare["pid"]


def test_min_workers_started_at_deploy_and_kept(server: Server) -> None:
    server.deploy(SCALE)
    ready = wait_for(
        lambda: (
            (ws := [w for w in server.workers() if w["unit"] == "kept"])
            and len(ws) == 2
            and all(w["state"] == "IDLE" for w in ws)
            and ws
        ),
        timeout=20,
        what="two min_workers",
    )
    ids = {w["id"] for w in ready}
    # well past idle_timeout (1 s) they are still there
    wait_for(
        lambda: all(w["age_s"] > 3 for w in server.workers() if w["id"] in ids),
        timeout=20,
        what="workers to age",
    )
    assert {w["id"] for w in server.workers() if w["unit"] == "kept"} == ids
    body = run(server, "scale", "kept")
    assert body["timings"]["cold_start_ms"] == 0
    assert body["output"] in {w["pid"] for w in ready}


def test_idle_worker_is_stopped_and_the_next_call_cold_starts(server: Server) -> None:
    server.deploy(SCALE)
    cold = run(server, "scale", "brief")
    assert cold["timings"]["cold_start_ms"] > 0
    warm = run(server, "scale", "brief")
    assert warm["output"] == cold["output"]
    assert warm["timings"]["cold_start_ms"] == 0 and warm["timings"]["load_ms"] == 0
    pid = cold["output"]
    wait_for(lambda: not pid_alive(pid), timeout=15, what="the idle worker to stop")
    # the server learns of the exit a moment later (from the process, or from its template)
    wait_for(lambda: not [w for w in server.workers() if w["unit"] == "brief"], what="no worker")
    again = run(server, "scale", "brief")
    assert again["output"] != pid
    assert again["timings"]["cold_start_ms"] > 0


LOAD = """
import time
import ember

app = ember.App("load")

@app.cls()
class Slow:
    @ember.enter()
    def load(self):
        time.sleep(0.3)

    @ember.method()
    def go(self) -> str:
        return "ok"
"""


def test_cold_call_shows_load_and_warm_call_does_not(server: Server) -> None:
    server.deploy(LOAD)
    cold = run(server, "load", "Slow.go")
    assert cold["output"] == "ok"
    assert cold["timings"]["cold_start_ms"] > 0
    assert cold["timings"]["load_ms"] >= 250
    warm = run(server, "load", "Slow.go")
    assert warm["timings"]["cold_start_ms"] == 0 and warm["timings"]["load_ms"] == 0


VERSIONED = """
import os, time
import ember

app = ember.App("ver")

@app.function()
def which(delay: float = 0) -> dict:
    time.sleep(delay)
    return {{"version": {version}, "pid": os.getpid()}}
"""


def test_redeploy_drains_old_workers_and_serves_the_new_code(server: Server) -> None:
    assert server.deploy(VERSIONED.format(version=1))["version"] == 1
    first = run(server, "ver", "which")["output"]
    assert first["version"] == 1
    slow = spawn(server, "ver", "which", delay=1.0)
    wait_for(lambda: server.client.get_job(slow)["status"] == "IN_PROGRESS", what="slow job")
    assert server.deploy(VERSIONED.format(version=2))["version"] == 2
    fresh = run(server, "ver", "which")["output"]
    assert fresh["version"] == 2 and fresh["pid"] != first["pid"]
    # the job already running on v1 finishes there; then the old worker exits
    old = result(server, slow)
    assert old["status"] == "COMPLETED" and old["output"]["version"] == 1
    wait_for(lambda: not pid_alive(first["pid"]), timeout=15, what="the v1 worker to exit")
    # the server learns of the exit a moment later (from the process, or from its template)
    wait_for(lambda: all(w["version"] == 2 for w in server.workers()), what="only v2 workers")


def test_queued_jobs_move_to_the_new_version_on_redeploy(server: Server) -> None:
    server.deploy(
        VERSIONED.format(version=1).replace("@app.function()", "@app.function(max_workers=1)")
    )
    busy = spawn(server, "ver", "which", delay=1.0)
    wait_for(lambda: server.client.get_job(busy)["status"] == "IN_PROGRESS", what="busy job")
    queued = [spawn(server, "ver", "which") for _ in range(3)]
    assert all(server.client.get_job(q)["status"] == "IN_QUEUE" for q in queued)
    server.deploy(VERSIONED.format(version=2))
    assert result(server, busy)["output"]["version"] == 1
    assert [result(server, q)["output"]["version"] for q in queued] == [2, 2, 2]


STREAM = """
import asyncio, os, time
import ember

app = ember.App("stream")

def wait_for_file(path):
    deadline = time.time() + 20
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.01)

@app.function()
def gen(path: str):
    yield "first"
    wait_for_file(path)  # only once the caller has seen "first"
    yield "second"

@app.function()
async def agen(path: str):
    yield "first"
    deadline = time.time() + 20
    while not os.path.exists(path) and time.time() < deadline:
        await asyncio.sleep(0.01)
    yield "second"
"""


def test_generator_outputs_are_streamed_as_they_are_yielded(server: Server, tmp_path: Path) -> None:
    server.deploy(STREAM)
    for fn in ("gen", "agen"):
        gate = tmp_path / f"{fn}.gate"
        got = []
        t0 = time.monotonic()
        for value in server.function("stream", fn).stream(str(gate)):
            got.append(value)
            if value == "first":
                gate.touch()  # the generator can only go on once this arrived
        assert got == ["first", "second"]
        assert time.monotonic() - t0 < 15, "the first output only arrived at the end"


LOGS = """
import sys
import ember

app = ember.App("logs")

@app.function()
def talk(x: int) -> int:
    print(f"hello {x}")
    print(f"oops {x}", file=sys.stderr)
    return x
"""


def test_logs_lines_carry_job_ids(server: Server) -> None:
    server.deploy(LOGS)
    a = run(server, "logs", "talk", x=1)["id"]
    b = run(server, "logs", "talk", x=2)["id"]

    def lines() -> list[dict[str, Any]]:
        resp = server.http("GET", "/v1/apps/logs/talk/logs")
        assert resp.status_code == 200
        got = [ln for ln in resp.json()["lines"] if ln["job"] in (a, b)]
        return got if len(got) == 4 else []

    got = wait_for(lines, timeout=10, what="4 log lines")
    by_job = {(ln["job"], ln["stream"], ln["line"]) for ln in got}
    assert by_job == {
        (a, "stdout", "hello 1"),
        (a, "stderr", "oops 1"),
        (b, "stdout", "hello 2"),
        (b, "stderr", "oops 2"),
    }


def test_warm_schedule_keeps_min_workers_only_inside_its_window(server: Server) -> None:
    server.deploy(
        """
        import ember

        app = ember.App("sched")

        @app.function(min_workers=1, warm_schedule="* * * * *")
        def always() -> int:
            return 1

        @app.function(min_workers=1, warm_schedule="0 0 29 2 *")
        def leap_midnight() -> int:
            return 2
        """
    )
    wait_for(lambda: [w["unit"] for w in server.workers()] == ["always"], what="one warm worker")
    assert server.function("sched", "leap_midnight").remote() == 2  # a call still cold-starts
