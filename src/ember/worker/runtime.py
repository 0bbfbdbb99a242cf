"""The worker process: connect, import the bundle, run `@enter` hooks, then serve jobs.

Sync code runs in a pool of `concurrency` threads (`threads.LifoPool`), async code as tasks on
this process's event loop; generator outputs are sent as they are yielded. If the connection to the server drops
(the server died), the process exits at once: a dead server leaves no workers behind.

The event loop reads the connection (runs, cancels, a drain); frames to the server are written
straight to the socket, under a lock, by whichever thread has one to send. So a sync job's thread
sends its own result: a call costs one thread wake-up (loop to job thread), not two.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ctypes
import functools
import os
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ember.worker import output as worker_output
from ember.worker import protocol
from ember.worker.loading import Loaded, load_unit, run_hooks
from ember.worker.output import Capture, current_job, error_body, output_json, redactor_from_env
from ember.worker.threads import LifoPool

MAX_PROGRESS = 1 << 20
"""The largest progress value a job may report, as JSON: a status, not an output."""


class Cancelled(BaseException):
    """Raised inside a job's thread to stop it; BaseException so `except Exception` lets it by."""


class Worker:
    def __init__(
        self,
        env: dict[str, str],
        preloaded: Loaded | None = None,
        secrets_seen: Sequence[str] = (),
        secret: str | None = None,
    ) -> None:
        self.preloaded = preloaded
        self.id = env["EMBER_WORKER_ID"]
        self.secret = secret if secret is not None else env["EMBER_WORKER_SECRET"]
        """Its credential for the control channel: handed over on stdin or in the fork request,
        so that it is in no environment or argv another process could read."""
        self.control = env["EMBER_CONTROL"]
        """`unix:PATH` (local and sandboxed workers) or `HOST:PORT`."""
        self.bundle = Path(env["EMBER_BUNDLE"])
        self.app_name = env["EMBER_APP"]
        self.unit_name = env["EMBER_UNIT"]
        self.concurrency = int(env.get("EMBER_CONCURRENCY", "1"))
        self.redact = redactor_from_env(env, secrets_seen)
        """Applied to everything sent to the server that user code produced: log lines,
        outputs, errors. None when the function has no secrets."""
        self.pool = LifoPool(self.concurrency, name="job")
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
        except Exception as exc:  # whatever user objects raise while encoded: the job fails now
            err = TypeError(
                f"the output of type {type(output).__name__} is not JSON-serialisable: "
                + error_body(exc)["message"]
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

    def _value_json(self, value: Any) -> bytes:
        try:
            return output_json(value, self.redact)
        except Exception:  # sent as its repr, or as its type where even repr fails
            try:
                text = repr(value)
            except Exception:
                text = f"<a {type(value).__name__} that is neither JSON nor repr()-able>"
            text = text if self.redact is None else self.redact.text(text)
            return protocol._dumps(text).encode("utf-8", "replace")

    def send_output(self, job_id: str, value: Any) -> None:
        raw = self._value_json(value)
        self.flush_logs()
        self.send({"t": "output", "job": job_id}, raw={"value": raw})

    def send_progress(self, job_id: str, value: Any) -> None:
        """A job's progress (RunPod's `progress_update`), which its status reads show."""
        raw = self._value_json(value)
        if len(raw) > MAX_PROGRESS:
            print(f"progress_update: {len(raw)} bytes of JSON, over {MAX_PROGRESS}: not sent")
            return
        self.send({"t": "progress", "job": job_id}, raw={"value": raw})

    def request_refresh(self) -> None:
        """RunPod's `refresh_worker`: the server drains this worker, so it takes no new job."""
        self.send({"t": "refresh"})

    def finish(
        self, job_id: str, result: dict[str, Any], t0: float, raw: dict[str, bytes] | None = None
    ) -> None:
        exec_ms = (time.perf_counter() - t0) * 1000.0
        for cap in (sys.stdout, sys.stderr):
            if isinstance(cap, Capture):
                cap.flush_job(job_id)
        self.flush_logs()
        if raw is not None and sum(map(len, raw.values())) > protocol.MAX_OUTPUT:
            size = sum(map(len, raw.values()))
            err = ValueError(
                f"the output is {size} bytes of JSON, over the limit of {protocol.MAX_OUTPUT}: "
                "return a smaller value, or write large data to a volume and return its path"
            )
            result, raw = {"ok": False, "error": error_body(err, self.redact)}, None
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
        if self.control.startswith("unix:"):
            reader, self.writer = await asyncio.open_unix_connection(self.control[5:])
        else:
            host, port = self.control.rsplit(":", 1)
            reader, self.writer = await asyncio.open_connection(host, int(port))
        # The loop reads the connection; frames go out on a duplicate of its socket, written
        # directly from whichever thread has one to send.
        fd = os.dup(self.writer.get_extra_info("socket").fileno())
        self.sock = socket.socket(fileno=fd)
        if self.sock.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send({"t": "hello", "worker": self.id, "secret": self.secret, "pid": os.getpid()})
        # A template's captures (what its module's logging handlers hold) now report as this
        # worker's; a plain process gets new ones before the user's module is imported.
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if isinstance(current, Capture):
                current.sink = self.log
            else:
                setattr(sys, name, Capture(name, self.log))
        self._flusher = asyncio.create_task(self._flush_logs_forever())
        worker_output.progress_sink, worker_output.refresh_sink = (
            self.send_progress,
            self.request_refresh,
        )
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


def drop_privileges(env: Mapping[str, str]) -> None:
    """In a sandbox that root started: become `nobody` (EMBER_RUN_AS) before user code runs."""
    uid = env.get("EMBER_RUN_AS")
    if uid and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(int(uid))
        os.setuid(int(uid))


def close_inherited() -> None:
    """Close every descriptor above stderr that this process inherited: the server's event loop
    does not close them all when it starts a worker (its listening socket, log files), and user
    code must reach none of them."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(3, 4096)
        return
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):
                os.close(fd)


def read_secret() -> str | None:
    """A plainly started worker's secret: the first line of its stdin, which then closes."""
    if "EMBER_WORKER_SECRET" in os.environ:  # started by hand, for a test or a debugger
        return None
    line = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return line


def main(
    preloaded: Loaded | None = None, secrets_seen: Sequence[str] = (), secret: str | None = None
) -> None:
    """Run a worker: in a fresh process, or in a fork of a template (`preloaded`, `secret`).
    `secrets_seen`: secret values the template had when it started, hidden too even if user code
    has since removed them from the environment (a token popped after a login, say)."""
    if preloaded is None:
        close_inherited()
        secret = read_secret()
        drop_privileges(os.environ)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if os.environ.get("EMBER_SERVER_PID") != "":  # in a sandbox, the kernel ends us with it
        server_pid = int(os.environ.get("EMBER_SERVER_PID") or os.getppid())
        threading.Thread(
            target=_exit_with_server, args=(server_pid,), name="ember-server-watch", daemon=True
        ).start()
    worker = Worker(dict(os.environ), preloaded, secrets_seen, secret)
    asyncio.run(worker.serve())
