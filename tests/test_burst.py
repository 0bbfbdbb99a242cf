"""A burst: 500 jobs at once to a function with max_workers=8."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from conftest import Server, wait_for

SOURCE = """
import os
import time

import ember

app = ember.App("burst")


@app.function(max_workers=8, idle_timeout=30)
def work(i: int) -> list:
    time.sleep(0.02)  # sleep-ok: the deployed function's simulated work
    return [i, os.getpid()]
"""


def test_a_burst_of_500_grows_the_pool_to_8_and_every_job_completes(
    make_server: Callable[..., Server],
) -> None:
    server = make_server()
    server.deploy(SOURCE)
    work = server.function("burst", "work")
    seen: set[str] = set()
    most = 0
    done = threading.Event()

    def watch() -> None:  # sample the pool while the burst runs
        nonlocal most
        while not done.is_set():
            workers = [w for w in server.workers() if w["app"] == "burst"]
            seen.update(w["id"] for w in workers)
            most = max(most, len(workers))
            done.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:  # submit as fast as the client can
        jobs = list(pool.map(lambda i: work.spawn(i), range(500)))
    try:
        results = [job.result(timeout=120) for job in jobs]
    finally:
        done.set()
        watcher.join()
    assert [r[0] for r in results] == list(range(500))  # none lost, in order
    pids = {r[1] for r in results}
    assert most == 8, f"the pool peaked at {most} workers"
    assert len(seen) == 8, f"{len(seen)} workers were started for a pool of at most 8"
    assert len(pids) == 8
    # no job starved: every job finished, and the pool shared the work
    counts = [sum(1 for r in results if r[1] == pid) for pid in pids]
    assert min(counts) > 0
    wait_for(lambda: server.client.health("burst", "work")["jobs"]["completed"] == 500)
