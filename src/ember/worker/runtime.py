"""The worker process: connect, import the bundle, run `@enter` hooks, then serve jobs.

Sync code runs in a thread pool of `concurrency` threads, async code as tasks on this process's
event loop; generator outputs are sent as they are yielded. If the connection to the server drops
(the server died), the process exits at once: a dead server leaves no workers behind.

The event loop reads the connection (runs, cancels, a drain); frames to the server are written
straight to the socket, under a lock, by whichever thread has one to send. So a sync job's thread
sends its own result: a call costs one thread wake-up (loop to job thread), not two.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import functools
import importlib.util
import io
import os
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.core.secrets import Redactor, secret_values
from ember.worker import protocol

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_job", default=None
)


class Cancelled(BaseException):
    """Raised inside a job's thread to stop it; BaseException so `except Exception` lets it by."""


def error_body(exc: BaseException, redact: Redactor | None = None) -> dict[str, Any]:
    """What the server learns of an exception; `redact` hides the function's secret values."""
    body = {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }
    return body if redact is None else {k: redact.text(v) for k, v in body.items()}


def output_json(value: Any, redact: Redactor | None = None) -> bytes:
    """An output (a result or a streamed value) as JSON, with the function's secret values
    hidden; raises TypeError or ValueError when it is not JSON-serialisable."""
    if redact is not None:
        value = redact.json(value)
    return protocol.dumps_value(value).encode()


def redactor_from_env(env: Mapping[str, str], also: Sequence[str] = ()) -> Redactor | None:
    """The redactor of the secrets the server gave this process (EMBER_SECRET_KEYS) and of
    `also`, or None when there is nothing to hide, so that the paths that send data skip
    redaction entirely."""
    redactor = Redactor([*secret_values(env), *also])
    return redactor if redactor else None


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


@dataclass
class Loaded:
    """A unit imported and ready to serve: what a template keeps and every fork inherits."""

    targets: dict[str, tuple[Callable[..., Any], str]]
    snap_hooks: list[Callable[[], Any]]
    """`@ember.enter(snap=True)`: CPU-side loading a template runs once for all its forks."""
    enter_hooks: list[Callable[[], Any]]
    """`@ember.enter()`: run in each worker (GPU set-up goes here)."""
    exit_hooks: list[Callable[[], Any]]


def load_unit(bundle: Path, app_name: str, unit_name: str) -> Loaded:
    """Import the user's file and find the function or class this process serves."""
    from ember.sdk.app import registered_app
    from ember.sdk.cls import Cls
    from ember.sdk.hooks import ENTER, hooks_of

    sys.path.insert(0, str(bundle.parent))
    name = bundle.stem
    spec = importlib.util.spec_from_file_location(name, bundle)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    try:
        app = registered_app(app_name)
    except KeyError:
        raise RuntimeError(f"{bundle.name} no longer defines ember.App({app_name!r})") from None
    unit = app.units.get(unit_name)
    if unit is None:
        raise RuntimeError(f"app {app_name!r} has no function or class {unit_name!r}")
    if not isinstance(unit, Cls):
        assert unit._local is not None
        return Loaded({unit.name: (unit._local, unit.kind)}, [], [], [])
    assert unit.user_cls is not None
    instance = unit.user_cls()
    enters, exits, _ = hooks_of(unit.user_cls)
    snap = [h for h in enters if getattr(getattr(unit.user_cls, h), ENTER)["snap"]]
    return Loaded(
        targets={h.name: (getattr(instance, m), h.kind) for m, h in unit.methods.items()},
        snap_hooks=[getattr(instance, h) for h in snap],
        enter_hooks=[getattr(instance, h) for h in enters if h not in snap],
        exit_hooks=[getattr(instance, h) for h in exits],
    )


async def run_hooks(hooks: list[Callable[[], Any]]) -> None:
    for hook in hooks:
        result = hook()
        if asyncio.iscoroutine(result):
            await result


class Worker:
    def __init__(
        self,
        env: dict[str, str],
        preloaded: Loaded | None = None,
        secrets_seen: Sequence[str] = (),
    ) -> None:
        self.preloaded = preloaded
        self.id = env["EMBER_WORKER_ID"]
        self.secret = env["EMBER_WORKER_SECRET"]
        host, port = env["EMBER_CONTROL"].rsplit(":", 1)
        self.addr = (host, int(port))
        self.bundle = Path(env["EMBER_BUNDLE"])
        self.app_name = env["EMBER_APP"]
        self.unit_name = env["EMBER_UNIT"]
        self.concurrency = int(env.get("EMBER_CONCURRENCY", "1"))
        self.redact = redactor_from_env(env, secrets_seen)
        """Applied to everything sent to the server that user code produced: log lines,
        outputs, errors. None when the function has no secrets."""
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="job")
        self.targets: dict[str, tuple[Callable[..., Any], str]] = {}
        self.exit_hooks: list[Callable[[], Any]] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}
        """Async jobs, as tasks on the loop."""
        self.sync_jobs: dict[str, Future[None]] = {}
        """Sync jobs, each in the pool, until its thread has sent its result; under cancel_lock."""
        self.threads: dict[str, int] = {}
        self.cancelled: set[str] = set()
        """Sync jobs asked to stop before their thread started; the thread checks on start."""
        self.cancel_lock = threading.Lock()
        self.logs: list[list[Any]] = []
        self.logs_lock = threading.Lock()
        self.send_lock = threading.RLock()
        """Held while a frame is written: frames from the loop and job threads never interleave."""
        self.sock: socket.socket | None = None
        self.draining = False

    # connection
    def send(self, msg: dict[str, Any], raw: dict[str, bytes] | None = None) -> None:
        """Write one frame now, from any thread."""
        self._write(protocol.encode(msg, raw))

    def _write(self, data: bytes) -> None:
        assert self.sock is not None
        with self.send_lock:
            view = memoryview(data)
            while view:
                try:
                    sent = self.sock.send(view)
                except BlockingIOError:  # the socket is non-blocking (the loop reads it): wait
                    select.select([], [self.sock], [])
                    continue
                except OSError:  # the server is gone: the loop sees it and exits
                    return
                view = view[sent:]

    def log(self, job: str | None, stream: str, line: str) -> None:
        if self.redact is not None:
            line = self.redact.text(line)
        with self.logs_lock:
            self.logs.append([job, stream, line, time.time()])

    def flush_logs(self) -> None:
        if not self.logs:
            return
        with self.send_lock:  # taken before the lines: they go out in the order they were taken
            with self.logs_lock:
                lines, self.logs = self.logs, []
            if lines:
                self.send({"t": "log", "lines": lines})

    async def _flush_logs_forever(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.flush_logs()

    # jobs
    async def run_job(self, msg: dict[str, Any]) -> None:
        """An async job (a coroutine or an async generator), as a task on the loop."""
        job_id: str = msg["job"]
        current_job.set(job_id)
        fn, kind = self.targets[msg["fn"]]
        kwargs = msg["input"]
        t0 = time.perf_counter()
        output: Any = None
        try:
            if kind == "async":
                output = await fn(**kwargs)
            else:
                async for value in fn(**kwargs):
                    self.send_output(job_id, value)
        except (asyncio.CancelledError, Cancelled):
            self.finish(job_id, {"status": "CANCELLED"}, t0)
            return
        except BaseException as exc:
            self.finish(job_id, {"ok": False, "error": error_body(exc, self.redact)}, t0)
            return
        result, raw = self._result_of(kind, output)
        self.finish(job_id, result, t0, raw=raw)

    def _result_of(self, kind: str, output: Any) -> tuple[dict[str, Any], dict[str, bytes] | None]:
        """The result of a job that returned `output`: (fields, raw JSON fields)."""
        if kind in ("generator", "async_generator"):
            return {"ok": True}, None
        try:
            raw = output_json(output, self.redact)
        except (TypeError, ValueError) as exc:
            err = TypeError(
                f"the output of type {type(output).__name__} is not JSON-serialisable: {exc}"
            )
            return {"ok": False, "error": error_body(err, self.redact)}, None
        return {"ok": True}, {"output": raw}

    def start_sync_job(self, msg: dict[str, Any]) -> None:
        """A sync job (a function or a generator): into the pool, in a copy of the loop's
        context with current_job set, as a task's would be; its thread reports the result."""
        job_id: str = msg["job"]
        ctx = contextvars.copy_context()
        ctx.run(current_job.set, job_id)
        with self.cancel_lock:
            self.sync_jobs[job_id] = self.pool.submit(ctx.run, self._run_sync_job, msg)

    def _run_sync_job(self, msg: dict[str, Any]) -> None:
        """In a pool thread: run the job, then send its result, exactly once."""
        job_id: str = msg["job"]
        fn, kind = self.targets[msg["fn"]]
        t0 = time.perf_counter()
        result: dict[str, Any] = {"status": "CANCELLED"}
        raw: dict[str, bytes] | None = None
        try:
            try:
                output = self._run_in_thread(job_id, fn, kind, msg["input"])
            except Cancelled:
                pass
            except BaseException as exc:
                result = {"ok": False, "error": error_body(exc, self.redact)}
            else:
                result, raw = self._result_of(kind, output)
        except Cancelled:  # a cancel that landed just as the job's code ended: it is cancelled
            result, raw = {"status": "CANCELLED"}, None
        try:
            self.finish(job_id, result, t0, raw=raw)
        finally:
            self._forget_sync(job_id)

    def _forget_sync(self, job_id: str) -> None:
        with self.cancel_lock:
            self.sync_jobs.pop(job_id, None)
            self.cancelled.discard(job_id)
            self.threads.pop(job_id, None)

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
                    self.send_output(job_id, value)
                return None
            return fn(**kwargs)
        finally:
            with self.cancel_lock:
                self.threads.pop(job_id, None)

    def send_output(self, job_id: str, value: Any) -> None:
        try:
            raw = output_json(value, self.redact)
        except (TypeError, ValueError):
            text = repr(value) if self.redact is None else self.redact.text(repr(value))
            raw = protocol._dumps(text).encode()
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
        if task is not None:
            task.cancel()
            return
        with self.cancel_lock:
            if job_id not in self.sync_jobs:
                return
            tid = self.threads.get(job_id)
            if tid is None:  # its thread has not started yet: it will see this and stop
                self.cancelled.add(job_id)
            else:  # raise Cancelled in its thread at the next bytecode
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(tid), ctypes.py_object(Cancelled)
                )

    def _forget_task(self, job_id: str, task: asyncio.Task[None]) -> None:
        self.tasks.pop(job_id, None)
        if task.cancelled():  # cancelled before it ever ran: nothing else reports it
            self.finish(job_id, {"status": "CANCELLED"}, time.perf_counter())

    async def drain(self) -> None:
        self.draining = True
        with self.cancel_lock:
            running = [asyncio.wrap_future(f) for f in self.sync_jobs.values()]
        if self.tasks or running:
            await asyncio.gather(*self.tasks.values(), *running, return_exceptions=True)
        for hook in self.exit_hooks:
            try:
                result = hook()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                traceback.print_exc()
        self.flush_logs()
        self.send({"t": "bye"})
        os._exit(0)

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        reader, self.writer = await asyncio.open_connection(*self.addr)
        # The loop reads the connection; frames go out on a duplicate of its socket, written
        # directly from whichever thread has one to send.
        fd = os.dup(self.writer.get_extra_info("socket").fileno())
        self.sock = socket.socket(fileno=fd)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send({"t": "hello", "worker": self.id, "secret": self.secret, "pid": os.getpid()})
        sys.stdout = _Capture("stdout", self.log)
        sys.stderr = _Capture("stderr", self.log)
        self._flusher = asyncio.create_task(self._flush_logs_forever())
        try:
            if self.preloaded is None:  # a plain process: import, then every enter hook here
                loaded = load_unit(self.bundle, self.app_name, self.unit_name)
                hooks = loaded.snap_hooks + loaded.enter_hooks
            else:  # forked from a template: imported and snap hooks run already
                loaded, hooks = self.preloaded, self.preloaded.enter_hooks
            self.targets, self.exit_hooks = loaded.targets, loaded.exit_hooks
            t0 = time.perf_counter()
            await run_hooks(hooks)
            load_ms = (time.perf_counter() - t0) * 1000.0
        except BaseException as exc:
            self.flush_logs()
            self.send({"t": "fatal", "error": error_body(exc, self.redact)})
            os._exit(1)
        self.send({"t": "ready", "load_ms": load_ms})
        while True:
            msg = await protocol.read(reader)
            if msg is None:  # the server is gone: stop everything now
                os._exit(0)
            kind = msg["t"]
            if kind == "run":
                if self.targets.get(msg["fn"], (None, ""))[1] in ("function", "generator"):
                    self.start_sync_job(msg)
                    continue
                task = asyncio.create_task(self.run_job(msg))
                self.tasks[msg["job"]] = task
                task.add_done_callback(functools.partial(self._forget_task, msg["job"]))
            elif kind == "cancel":
                self.cancel(msg["job"])
            elif kind == "drain" and not self.draining:
                self._drainer = asyncio.create_task(self.drain())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except ProcessLookupError:
        return False
    except OSError:
        return True


def _exit_with_server(server_pid: int, interval: float = 0.2) -> None:
    """Exit once the server is gone, even while user code blocks the event loop (a long
    `@enter` hook, a blocking call in async code) so that it cannot see the connection drop.
    A worker forked from a template outlives the template (a redeploy retires it while its
    workers drain), so losing a parent other than the server only means: check the server."""
    parent = os.getppid()
    while True:
        time.sleep(interval)
        if os.getppid() != parent and (parent == server_pid or not _alive(server_pid)):
            os._exit(0)


def main(preloaded: Loaded | None = None, secrets_seen: Sequence[str] = ()) -> None:
    """Run a worker: in a fresh process, or in a fork of a template (`preloaded`).
    `secrets_seen`: secret values the template had when it started, hidden too even if user code
    has since removed them from the environment (a token popped after a login, say)."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    server_pid = int(os.environ.get("EMBER_SERVER_PID") or os.getppid())
    threading.Thread(
        target=_exit_with_server, args=(server_pid,), name="ember-server-watch", daemon=True
    ).start()
    worker = Worker(dict(os.environ), preloaded, secrets_seen)
    asyncio.run(worker.serve())
