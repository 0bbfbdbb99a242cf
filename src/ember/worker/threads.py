"""The worker's pool of job threads: the thread that went idle last runs the next job.

`ThreadPoolExecutor` hands each job to the thread that has waited longest, so sequential calls
to a function of concurrency 32 go round all 32 threads, each woken with cold caches, its stack
and objects long evicted: on a small VM that costs a warm call about a tenth of a millisecond.
Here idle threads wait on a stack, each on a lock of its own, and a job wakes the one on top: the
thread that ran the last job runs the next.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

Work = tuple[Callable[[], Any], "Future[Any]"]


class _Slot:
    __slots__ = ("wake", "work")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()  # released to hand the thread its next work
        self.work: Work | None = None


class LifoPool:
    """At most `size` threads; a job goes to the thread idle most recently, or to a new thread
    while there are fewer than `size`, or waits for the next thread to finish."""

    def __init__(self, size: int, name: str = "job") -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one thread, not {size}")
        self.size, self.name = size, name
        self._lock = threading.Lock()
        self._idle: list[_Slot] = []
        self._backlog: deque[Work] = deque()
        self._threads = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        work: Work = ((lambda: fn(*args)) if args else fn, fut)
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is shut down")
            if self._idle:
                slot = self._idle.pop()
                slot.work = work
                slot.wake.release()
            elif self._threads < self.size:
                self._threads += 1
                threading.Thread(
                    target=self._run,
                    args=(_Slot(), work),
                    name=f"{self.name}_{self._threads}",
                    daemon=True,
                ).start()
            else:
                self._backlog.append(work)
        return fut

    def shutdown(self) -> None:
        """Let every thread end once it is idle; queued work still runs."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for slot in idle:
            slot.work = None
            slot.wake.release()

    def _run(self, slot: _Slot, work: Work | None) -> None:
        while work is not None:
            fn, fut = work
            result: Any = None
            error: BaseException | None = None
            ran = fut.set_running_or_notify_cancel()
            if ran:
                try:
                    result = fn()
                except BaseException as exc:
                    error = exc
            # Back on the stack before the job's future is settled: whoever waits on it and
            # submits the next job finds this thread idle, not a reason to start another.
            with self._lock:
                work = self._backlog.popleft() if self._backlog else None
                closed = self._closed
                if work is None and not closed:
                    self._idle.append(slot)
            if ran:
                if error is None:
                    fut.set_result(result)
                else:
                    fut.set_exception(error)
            del fn, fut, result, error
            if work is None:
                if closed:
                    break
                slot.wake.acquire()
                work, slot.work = slot.work, None
        with self._lock:
            self._threads -= 1
