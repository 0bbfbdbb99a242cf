"""The worker process: connect, import the bundle, run `@enter` hooks, then serve jobs.

Sync code runs in a thread pool of `concurrency` threads, async code as tasks on this process's
event loop; generator outputs are sent as they are yielded. If the connection to the server drops
(the server died), the process exits at once: a dead server leaves no workers behind.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import functools
import importlib.util
import io
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ember.worker import protocol

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_job", default=None
)


class Cancelled(BaseException):
    """Raised inside a job's thread to stop it; BaseException so `except Exception` lets it by."""


def error_body(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


class _Capture(io.TextIOBase):
    """sys.stdout / sys.stderr: each complete line goes to the server tagged with its job id."""

    def __init__(self, stream: str, sink: Callable[[str | None, str, str], None]) -> None:
        self.stream, self.sink = stream, sink
        self._partial: dict[str | None, str] = {}
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        job = current_job.get()
        with self._lock:
            text = self._partial.pop(job, "") + s
            *lines, rest = text.split("\n")
            if rest:
                self._partial[job] = rest
        for line in lines:
            self.sink(job, self.stream, line)
        return len(s)

    def flush_job(self, job: str | None) -> None:
        with self._lock:
            rest = self._partial.pop(job, None)
        if rest:
            self.sink(job, self.stream, rest)


class Worker:
    def __init__(self, env: dict[str, str]) -> None:
        self.id = env["EMBER_WORKER_ID"]
        self.secret = env["EMBER_WORKER_SECRET"]
        host, port = env["EMBER_CONTROL"].rsplit(":", 1)
        self.addr = (host, int(port))
        self.bundle = Path(env["EMBER_BUNDLE"])
        self.app_name = env["EMBER_APP"]
        self.unit_name = env["EMBER_UNIT"]
        self.concurrency = int(env.get("EMBER_CONCURRENCY", "1"))
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="job")
        self.targets: dict[str, tuple[Callable[..., Any], str]] = {}
        self.exit_hooks: list[Callable[[], Any]] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.threads: dict[str, int] = {}
        self.sync_jobs: set[str] = set()
        self.cancelled: set[str] = set()
        """Sync jobs asked to stop before their thread started; the thread checks on start."""
        self.cancel_lock = threading.Lock()
        self.logs: list[list[Any]] = []
        self.logs_lock = threading.Lock()
        self.draining = False

    # connection
    def send(self, msg: dict[str, Any], raw: dict[str, bytes] | None = None) -> None:
        self.writer.write(protocol.encode(msg, raw))

    def send_threadsafe(self, msg: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.send, msg)

    def log(self, job: str | None, stream: str, line: str) -> None:
        with self.logs_lock:
            self.logs.append([job, stream, line, time.time()])

    def flush_logs(self) -> None:
        with self.logs_lock:
            lines, self.logs = self.logs, []
        if lines:
            self.send({"t": "log", "lines": lines})

    async def _flush_logs_forever(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.flush_logs()

    # loading
    def load(self) -> None:
        """Import the user's file and find the unit this worker serves."""
        from ember.sdk.app import registered_app
        from ember.sdk.cls import Cls
        from ember.sdk.hooks import hooks_of

        sys.path.insert(0, str(self.bundle.parent))
        name = self.bundle.stem
        spec = importlib.util.spec_from_file_location(name, self.bundle)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        try:
            app = registered_app(self.app_name)
        except KeyError:
            raise RuntimeError(
                f"{self.bundle.name} no longer defines ember.App({self.app_name!r})"
            ) from None
        unit = app.units.get(self.unit_name)
        if unit is None:
            raise RuntimeError(f"app {self.app_name!r} has no function or class {self.unit_name!r}")
        if isinstance(unit, Cls):
            assert unit.user_cls is not None
            self.instance = unit.user_cls()
            enters, exits, _ = hooks_of(unit.user_cls)
            self.enter_hooks = [getattr(self.instance, h) for h in enters]
            self.exit_hooks = [getattr(self.instance, h) for h in exits]
            for m, handle in unit.methods.items():
                self.targets[handle.name] = (getattr(self.instance, m), handle.kind)
        else:
            assert unit._local is not None
            self.enter_hooks = []
            self.targets[unit.name] = (unit._local, unit.kind)

    # jobs
    async def run_job(self, msg: dict[str, Any]) -> None:
        job_id: str = msg["job"]
        current_job.set(job_id)
        fn, kind = self.targets[msg["fn"]]
        kwargs = msg["input"]
        t0 = time.perf_counter()
        output: Any = None
        try:
            if kind == "async":
                output = await fn(**kwargs)
            elif kind == "async_generator":
                async for value in fn(**kwargs):
                    self.send_output(job_id, value)
            else:
                ctx = contextvars.copy_context()
                call = functools.partial(self._run_in_thread, job_id, fn, kind, kwargs)
                output = await self.loop.run_in_executor(self.pool, ctx.run, call)
        except (asyncio.CancelledError, Cancelled):
            self.finish(job_id, {"status": "CANCELLED"}, t0)
            return
        except BaseException as exc:
            self.finish(job_id, {"ok": False, "error": error_body(exc)}, t0)
            return
        if kind in ("generator", "async_generator"):
            self.finish(job_id, {"ok": True}, t0)
            return
        try:
            raw = protocol.dumps_value(output).encode()
        except (TypeError, ValueError) as exc:
            err = TypeError(
                f"the output of type {type(output).__name__} is not JSON-serialisable: {exc}"
            )
            self.finish(job_id, {"ok": False, "error": error_body(err)}, t0)
            return
        self.finish(job_id, {"ok": True}, t0, raw={"output": raw})

    def _run_in_thread(
        self, job_id: str, fn: Callable[..., Any], kind: str, kwargs: dict[str, Any]
    ) -> Any:
        with self.cancel_lock:
            if job_id in self.cancelled:
                raise Cancelled()
            self.threads[job_id] = threading.get_ident()
        try:
            if kind == "generator":
                for value in fn(**kwargs):
                    self.loop.call_soon_threadsafe(self.send_output, job_id, value)
                return None
            return fn(**kwargs)
        finally:
            with self.cancel_lock:
                self.threads.pop(job_id, None)

    def send_output(self, job_id: str, value: Any) -> None:
        try:
            raw = protocol.dumps_value(value).encode()
        except (TypeError, ValueError):
            raw = protocol._dumps(repr(value)).encode()
        self.flush_logs()
        self.send({"t": "output", "job": job_id}, raw={"value": raw})

    def finish(
        self, job_id: str, result: dict[str, Any], t0: float, raw: dict[str, bytes] | None = None
    ) -> None:
        exec_ms = (time.perf_counter() - t0) * 1000.0
        for cap in (sys.stdout, sys.stderr):
            if isinstance(cap, _Capture):
                cap.flush_job(job_id)
        self.flush_logs()
        self.send({"t": "result", "job": job_id, "exec_ms": exec_ms, **result}, raw=raw)

    def cancel(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        if task is None:
            return
        if job_id not in self.sync_jobs:
            task.cancel()
            return
        # Sync code: never cancel the task, which would leave its thread running unseen.
        with self.cancel_lock:
            tid = self.threads.get(job_id)
            if tid is None:  # its thread has not started yet: it will see this and stop
                self.cancelled.add(job_id)
            else:  # raise Cancelled in its thread at the next bytecode
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(tid), ctypes.py_object(Cancelled)
                )

    def _forget_task(self, job_id: str, task: asyncio.Task[None]) -> None:
        self.tasks.pop(job_id, None)
        self.sync_jobs.discard(job_id)
        with self.cancel_lock:
            self.cancelled.discard(job_id)
        if task.cancelled():  # cancelled before it ever ran: nothing else reports it
            self.finish(job_id, {"status": "CANCELLED"}, time.perf_counter())

    async def drain(self) -> None:
        self.draining = True
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for hook in self.exit_hooks:
            try:
                result = hook()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                traceback.print_exc()
        self.flush_logs()
        self.send({"t": "bye"})
        await self.writer.drain()
        os._exit(0)

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        reader, self.writer = await asyncio.open_connection(*self.addr)
        self.send({"t": "hello", "worker": self.id, "secret": self.secret, "pid": os.getpid()})
        sys.stdout = _Capture("stdout", self.log)
        sys.stderr = _Capture("stderr", self.log)
        self._flusher = asyncio.create_task(self._flush_logs_forever())
        try:
            self.load()
            t0 = time.perf_counter()
            for hook in self.enter_hooks:
                result = hook()
                if asyncio.iscoroutine(result):
                    await result
            load_ms = (time.perf_counter() - t0) * 1000.0
        except BaseException as exc:
            self.flush_logs()
            self.send({"t": "fatal", "error": error_body(exc)})
            await self.writer.drain()
            os._exit(1)
        self.send({"t": "ready", "load_ms": load_ms})
        while True:
            msg = await protocol.read(reader)
            if msg is None:  # the server is gone: stop everything now
                os._exit(0)
            kind = msg["t"]
            if kind == "run":
                task = asyncio.create_task(self.run_job(msg))
                self.tasks[msg["job"]] = task
                if self.targets.get(msg["fn"], (None, ""))[1] in ("function", "generator"):
                    self.sync_jobs.add(msg["job"])
                task.add_done_callback(functools.partial(self._forget_task, msg["job"]))
            elif kind == "cancel":
                self.cancel(msg["job"])
            elif kind == "drain" and not self.draining:
                self._drainer = asyncio.create_task(self.drain())


def _exit_with_parent(ppid: int, interval: float = 0.2) -> None:
    """Exit once the server (our parent) is gone, even while user code blocks the event loop
    (a long `@enter` hook, a blocking call in async code) so that it cannot see the drop."""
    while True:
        time.sleep(interval)
        if os.getppid() != ppid:
            os._exit(0)


def main() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    threading.Thread(
        target=_exit_with_parent, args=(os.getppid(),), name="ember-parent", daemon=True
    ).start()
    worker = Worker(dict(os.environ))
    asyncio.run(worker.serve())
