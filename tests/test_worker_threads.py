"""The worker's job threads (`ember.worker.threads.LifoPool`): the thread idle last runs the next
job, never more than `size` threads, work beyond them waits its turn, errors reach the future."""

from __future__ import annotations

import threading

import pytest

from ember.worker.threads import LifoPool


def test_sequential_jobs_run_on_one_thread() -> None:
    pool = LifoPool(32)
    names = {pool.submit(lambda: threading.current_thread().name).result(5) for _ in range(50)}
    pool.shutdown()
    assert len(names) == 1


def test_at_most_size_threads_and_the_rest_wait_their_turn() -> None:
    pool = LifoPool(3)
    release = threading.Event()
    running = threading.Semaphore(0)
    peak, now, lock = [0], [0], threading.Lock()

    def job(i: int) -> int:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        running.release()
        release.wait(10)
        with lock:
            now[0] -= 1
        return i

    futures = [pool.submit(job, i) for i in range(10)]
    for _ in range(3):
        assert running.acquire(timeout=5)
    assert not running.acquire(timeout=0.2)  # the other 7 wait for a thread
    release.set()
    assert [f.result(10) for f in futures] == list(range(10))
    assert peak[0] == 3
    pool.shutdown()


def test_an_error_reaches_the_future_and_the_thread_lives_on() -> None:
    pool = LifoPool(1)

    def boom() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        pool.submit(boom).result(5)
    assert pool.submit(lambda: 42).result(5) == 42
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: 1)


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LifoPool(0)
