"""What goes wrong, and what the platform does about it: errors, crashes, timeouts, cancels."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import UNSANDBOXED, Server, pid_alive, wait_for

TERMS = ("queue_ms", "cold_start_ms", "load_ms", "exec_ms", "post_ms")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


def check_timings(body: dict[str, Any]) -> dict[str, float]:
    """Every job, however it ended: total = queue + cold_start + load + exec + post."""
    t = body["timings"]
    assert t is not None, body
    assert all(t[k] >= 0 for k in (*TERMS, "total_ms")), t
    assert abs(sum(t[k] for k in TERMS) - t["total_ms"]) < 0.01, t
    return t


def run(server: Server, fn: str, **input: Any) -> dict[str, Any]:
    body = server.client.runsync("fail", fn, input)
    assert body["status"] in TERMINAL, body
    check_timings(body)
    return body


def spawn(server: Server, fn: str, **input: Any) -> str:
    return str(server.client.run("fail", fn, input)["id"])


def job(server: Server, job_id: str) -> dict[str, Any]:
    return server.client.get_job(job_id)


def result(server: Server, job_id: str, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = server.client.get_job(job_id, wait=1)
        return body if body["status"] in TERMINAL else None

    body: dict[str, Any] = wait_for(done, timeout=timeout, what=f"job {job_id} to end")
    check_timings(body)
    return body


def running_on(server: Server, job_id: str) -> dict[str, Any]:
    """The worker running `job_id`, once it runs."""

    def find() -> dict[str, Any] | None:
        for w in server.workers():
            if job_id in w["jobs"] and w["pid"]:
                return w
        return None

    w: dict[str, Any] = wait_for(find, timeout=20, what=f"job {job_id} to run")
    return w


SOURCE = """
import asyncio, os, time
import ember

app = ember.App("fail")

@app.function()
def boom(fail: bool) -> int:
    if fail:
        raise ValueError(f"bad input {fail}")
    return os.getpid()

@app.function()
def die(code: int) -> int:
    os._exit(code)

@app.function(retries=0)
def hang(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"

@app.function(retries=2)
def flaky(marker: str) -> str:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return "second time lucky"

@app.function(retries=1)
def always_dies() -> None:
    os._exit(7)

@app.function(timeout=1)
def slow(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()

@app.function(max_workers=1)
def spin(path: str) -> None:
    while True:
        with open(path, "a") as f:
            f.write("x")
        time.sleep(0.01)

@app.function()
def pid(seconds: float = 0) -> int:
    time.sleep(seconds)
    return os.getpid()

@app.function(max_workers=1)
def single(seconds: float, path: str = "") -> str:
    if path:
        open(path, "w").close()
    time.sleep(seconds)
    return "done"

@app.function(concurrency=4, max_workers=1)
def shared(path: str = "", seconds: float = 0) -> int:
    if not path:  # CPU-bound: holds the GIL most of the time
        t = time.time()
        while time.time() - t < seconds:
            pass
        return os.getpid()
    while True:
        with open(path, "a") as f:
            f.write("x")
        time.sleep(0.01)

@app.function()
def unjsonable(kind: str):
    return {"set": {1, 2}, "object": object(), "nan": float("nan")}[kind]

@app.function(timeout=2, concurrency=2, max_workers=1)
def neighbour(marker: str = "", started: str = "") -> str:
    if started:
        time.sleep(1)
        open(started, "w").close()
        time.sleep(30)  # times out, taking its worker down
        return "never"
    if os.path.exists(marker):
        return "ran again"
    open(marker, "w").close()
    time.sleep(30)
    return "never"

@app.function()
async def waiting(seconds: float) -> int:
    await asyncio.sleep(seconds)
    return os.getpid()

@app.function(min_workers=1)
def resident() -> int:
    return os.getpid()

@app.cls(timeout=1)
class Stuck:
    @ember.enter()
    def load(self):
        time.sleep(600)

    @ember.method()
    def predict(self, x: int) -> int:
        return x

@app.cls()
class Vanishing:
    @ember.enter()
    def load(self):
        os._exit(2)

    @ember.method()
    def predict(self, x: int) -> int:
        return x

@app.cls()
class Broken:
    @ember.enter()
    def load(self):
        raise RuntimeError("the model file is missing")

    @ember.method()
    def predict(self, x: int) -> int:
        return x
"""


@pytest.fixture
def app(make_server: Callable[..., Server]) -> Server:
    server = make_server(*UNSANDBOXED)  # its functions signal through files, report their pids
    server.deploy(SOURCE)
    return server


def test_exception_fails_the_job_and_the_worker_lives_on(app: Server) -> None:
    pid = run(app, "boom", fail=False)["output"]
    body = run(app, "boom", fail=True)
    assert body["status"] == "FAILED" and body["output"] is None
    err = body["error"]
    assert err["type"] == "ValueError"
    assert err["message"] == "bad input True"
    assert "Traceback" in err["traceback"] and "in boom" in err["traceback"]
    assert 'raise ValueError(f"bad input {fail}")' in err["traceback"]
    assert run(app, "boom", fail=False)["output"] == pid
    assert pid_alive(pid)


@pytest.mark.parametrize("code", [1, 5])
def test_os_exit_fails_the_job_with_the_exit_code(app: Server, code: int) -> None:
    body = run(app, "die", code=code)
    assert body["status"] == "FAILED"
    assert body["error"]["type"] == "WorkerExited"
    assert f"worker exited with code {code}" in body["error"]["message"]
    # the pool recovers: the next call gets a fresh worker
    assert run(app, "boom", fail=False)["status"] == "COMPLETED"


def test_sigkill_of_a_worker_fails_its_job(app: Server) -> None:
    job_id = spawn(app, "hang", seconds=60)
    w = running_on(app, job_id)
    os.kill(w["pid"], signal.SIGKILL)
    body = result(app, job_id)
    assert body["status"] == "FAILED"
    assert f"worker exited with code {-signal.SIGKILL}" in body["error"]["message"]
    assert body["timings"]["exec_ms"] > 0 and body["timings"]["post_ms"] < 50
    assert not any(x["id"] == w["id"] for x in app.workers())


def test_crash_on_first_attempt_is_retried(app: Server, tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    body = run(app, "flaky", marker=str(marker))
    assert marker.exists()
    assert body["status"] == "COMPLETED", body
    assert body["output"] == "second time lucky"


def test_retries_run_out(app: Server) -> None:
    body = run(app, "always_dies")
    assert body["status"] == "FAILED"
    assert "worker exited with code 7" in body["error"]["message"]
    assert body["attempts"] == 2


def test_timeout_ends_the_job_and_replaces_its_worker(app: Server) -> None:
    first = run(app, "slow", seconds=0)["output"]
    body = run(app, "slow", seconds=30)
    assert body["status"] == "TIMED_OUT"
    assert body["error"]["type"] == "TimeoutError" and "timeout of 1 s" in body["error"]["message"]
    t = body["timings"]
    assert 1000 <= t["total_ms"] < 10_000
    # the time it ran is exec time, not result delivery
    assert t["exec_ms"] >= 950 and t["post_ms"] < 50, t
    wait_for(lambda: not pid_alive(first), timeout=10, what="the timed-out worker to be stopped")
    again = run(app, "slow", seconds=0)
    assert again["status"] == "COMPLETED" and again["output"] != first


def test_a_timeout_requeues_the_other_jobs_of_its_worker(app: Server, tmp_path: Path) -> None:
    started = tmp_path / "doomed"
    doomed = spawn(app, "neighbour", started=str(started))
    # the other job starts a second later, so the doomed one times out well before it could
    wait_for(started.exists, what="the doomed job to have run a while")
    marker = tmp_path / "neighbour"
    other = spawn(app, "neighbour", marker=str(marker))
    wait_for(marker.exists, what="the other job to start on the same worker")
    assert result(app, doomed)["status"] == "TIMED_OUT"
    body = result(app, other)
    assert body["status"] == "COMPLETED" and body["output"] == "ran again"
    assert body["attempts"] == 0, "not its fault: no attempt is used up"


def test_a_killed_idle_worker_is_replaced_for_min_workers(app: Server) -> None:
    [w] = wait_for(
        lambda: [x for x in app.workers() if x["unit"] == "resident" and x["state"] == "IDLE"],
        what="the min_workers worker",
    )
    os.kill(w["pid"], signal.SIGKILL)
    [new] = wait_for(
        lambda: [
            x
            for x in app.workers()
            if x["unit"] == "resident" and x["state"] == "IDLE" and x["id"] != w["id"]
        ],
        what="a replacement worker",
    )
    assert run(app, "resident")["output"] == new["pid"] != w["pid"]


def test_cancel_interrupts_python_code_and_the_worker_survives(app: Server, tmp_path: Path) -> None:
    path = tmp_path / "spin.txt"
    job_id = spawn(app, "spin", path=str(path))
    w = running_on(app, job_id)
    wait_for(lambda: path.exists() and path.stat().st_size > 5, what="the loop to run")
    body = app.client.cancel(job_id)
    assert body["status"] == "CANCELLED"
    assert check_timings(body)["exec_ms"] > 0
    # the worker reports the job stopped, and is free again
    wait_for(
        lambda: any(x["id"] == w["id"] and not x["jobs"] for x in app.workers()),
        timeout=10,
        what="the worker to let go of the job",
    )
    size = path.stat().st_size
    # a job that takes a while on the same worker (max_workers=1): the loop must not write meanwhile
    assert run(app, "single", seconds=0.3)["status"] == "COMPLETED"
    assert path.stat().st_size == size, "the cancelled loop is still running"
    assert pid_alive(w["pid"])
    assert [x["pid"] for x in app.workers() if x["unit"] == "spin"] == [w["pid"]]
    assert job(app, job_id)["status"] == "CANCELLED"


def test_cancel_right_after_dispatch_spares_the_worker_and_its_other_jobs(
    app: Server, tmp_path: Path
) -> None:
    """A cancel that reaches a busy worker before the job's thread has started still stops the
    job, without stopping the worker and the other jobs it runs."""
    pid = run(app, "shared")["output"]
    burners = [spawn(app, "shared", seconds=3) for _ in range(2)]
    for b in burners:
        running_on(app, b)
    paths = [tmp_path / f"spin{i}" for i in range(3)]
    for path in paths:
        job_id = spawn(app, "shared", path=str(path))
        assert app.client.cancel(job_id)["status"] == "CANCELLED"
        wait_for(
            lambda j=job_id: all(j not in w["jobs"] for w in app.workers()),
            timeout=10,
            what="the worker to let go of the cancelled job",
        )
    sizes = [p.stat().st_size if p.exists() else 0 for p in paths]
    for b in burners:
        body = result(app, b)
        assert body["status"] == "COMPLETED" and body["output"] == pid
        assert body["attempts"] == 0, "the job was restarted"
    assert [p.stat().st_size if p.exists() else 0 for p in paths] == sizes
    assert [w["pid"] for w in app.workers() if w["unit"] == "shared"] == [pid]


def test_cancel_of_async_code_cancels_its_task_and_the_worker_survives(app: Server) -> None:
    pid = run(app, "waiting", seconds=0)["output"]
    job_id = spawn(app, "waiting", seconds=1000)
    w = running_on(app, job_id)
    assert w["pid"] == pid
    assert app.client.cancel(job_id)["status"] == "CANCELLED"
    wait_for(
        lambda: any(x["id"] == w["id"] and not x["jobs"] for x in app.workers()),
        timeout=10,
        what="the worker to let go of the job",
    )
    assert run(app, "waiting", seconds=0)["output"] == pid


def test_cancel_of_uninterruptible_code_stops_the_worker(app: Server) -> None:
    job_id = spawn(app, "hang", seconds=1000)
    w = running_on(app, job_id)
    body = app.client.cancel(job_id)
    assert body["status"] == "CANCELLED"
    wait_for(lambda: not pid_alive(w["pid"]), timeout=10, what="the stuck worker to be stopped")
    assert result(app, job_id)["status"] == "CANCELLED"
    assert run(app, "hang", seconds=0)["output"] == "woke"


def test_cancel_a_queued_job(app: Server, tmp_path: Path) -> None:
    first = spawn(app, "single", seconds=1.0)
    running_on(app, first)
    ran = tmp_path / "queued-ran"
    queued = spawn(app, "single", seconds=0, path=str(ran))
    assert job(app, queued)["status"] == "IN_QUEUE"
    body = app.client.cancel(queued)
    assert body["status"] == "CANCELLED"
    t = check_timings(body)
    assert t["exec_ms"] == 0 and t["cold_start_ms"] == 0
    assert result(app, first)["status"] == "COMPLETED"
    # the worker is free and the cancelled job never reached it
    assert run(app, "single", seconds=0)["status"] == "COMPLETED"
    assert not ran.exists()
    assert job(app, queued)["status"] == "CANCELLED"


def test_concurrent_cancels_of_one_job(app: Server) -> None:
    job_id = spawn(app, "hang", seconds=1000)
    w = running_on(app, job_id)
    answers: list[Any] = []

    def cancel() -> None:
        try:
            answers.append(app.http("POST", f"/v1/jobs/{job_id}/cancel"))
        except Exception as exc:  # pragma: no cover - reported below
            answers.append(exc)

    threads = [threading.Thread(target=cancel) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(getattr(a, "status_code", None) == 200 for a in answers), answers
    assert {a.json()["status"] for a in answers} == {"CANCELLED"}
    wait_for(lambda: not pid_alive(w["pid"]), timeout=10, what="the stuck worker to stop")
    # cancelling a finished job again changes nothing
    again = app.client.cancel(job_id)
    assert again["status"] == "CANCELLED"
    assert run(app, "hang", seconds=0)["output"] == "woke"
    assert app.http("GET", "/v1/health").status_code == 200


def test_cancel_a_job_twice_in_a_row_while_it_stops(app: Server, tmp_path: Path) -> None:
    path = tmp_path / "spin.txt"
    job_id = spawn(app, "spin", path=str(path))
    running_on(app, job_id)
    assert app.client.cancel(job_id)["status"] == "CANCELLED"
    assert app.client.cancel(job_id)["status"] == "CANCELLED"
    assert result(app, job_id)["status"] == "CANCELLED"


def test_failing_enter_hook_fails_queued_jobs(app: Server) -> None:
    ids = [spawn(app, "Broken.predict", x=i) for i in range(3)]
    for job_id in ids:
        body = result(app, job_id, timeout=20)
        assert body["status"] == "FAILED"
        assert body["error"]["type"] == "RuntimeError"
        assert "the model file is missing" in body["error"]["message"]
        assert "Traceback" in (body["error"]["traceback"] or "")
    # a later call fails the same way rather than hanging
    body = run(app, "Broken.predict", x=1)
    assert body["status"] == "FAILED" and "the model file is missing" in body["error"]["message"]


def test_enter_hook_that_exits_fails_queued_jobs(app: Server) -> None:
    body = run(app, "Vanishing.predict", x=1)
    assert body["status"] == "FAILED"
    assert "worker failed to start" in body["error"]["message"]
    assert "exited with code 2" in body["error"]["message"]


def test_enter_hook_that_hangs_fails_queued_jobs_after_the_timeout(app: Server) -> None:
    ids = [spawn(app, "Stuck.predict", x=i) for i in range(2)]
    for job_id in ids:
        body = result(app, job_id, timeout=20)
        assert body["status"] == "FAILED"
        assert "did not become ready" in body["error"]["message"]
    wait_for(
        lambda: not [w for w in app.workers() if w["unit"] == "Stuck"],
        timeout=10,
        what="the stuck worker to be stopped",
    )


@pytest.mark.parametrize("kind", ["set", "object", "nan"])
def test_output_that_is_not_json_fails_clearly(app: Server, kind: str) -> None:
    body = run(app, "unjsonable", kind=kind)
    assert body["status"] == "FAILED"
    assert body["error"]["type"] == "TypeError"
    assert "not JSON-serialisable" in body["error"]["message"]
    assert run(app, "boom", fail=False)["status"] == "COMPLETED"


def test_every_job_reports_its_timings(app: Server) -> None:
    """Mixed outcomes, cold and warm: the terms add up to the total for each."""
    ids = [spawn(app, "pid", seconds=0.05) for _ in range(5)]
    ids += [spawn(app, "boom", fail=True), spawn(app, "die", code=2)]
    bodies = [result(app, i) for i in ids]
    assert {b["status"] for b in bodies} == {"COMPLETED", "FAILED"}
    for b in bodies:
        assert b["timings"]["total_ms"] > 0
    for b in bodies[:5]:
        assert b["timings"]["exec_ms"] >= 40
