"""The template: a process that imports one function version once and forks its workers.

It imports the user's file and runs `@ember.enter(snap=True)` hooks (CPU-side loading, a model
read from disk, say), then waits. Each fork request becomes a worker in milliseconds: the child
inherits the imported modules and the loaded objects (shared copy-on-write), takes its own
environment (its GPUs in CUDA_VISIBLE_DEVICES), runs the remaining `@ember.enter()` hooks and
connects to the server like any worker. Nothing touches a GPU before the fork: the template runs
with no visible CUDA device. A template and its forks share one sandbox (`backends/sandbox.py`).

Protocol with the server: stdin is a Unix socket on which the server sends one JSON object per
line, `{"worker", "secret", "env"}`, each with the new worker's log file attached as a file
descriptor (the file itself is out of the sandbox's sight); stdout carries one JSON object per
line back: `{"t": "ready"}` or `{"t": "failed", "error"}` once, `{"t": "log", "lines"}` for what
the user's module printed (redacted), `{"t": "forked", "worker", "pid"}` and
`{"t": "exited", "pid", "code"}`. stderr is the template's own raw log. When its stdin closes (the
server is gone) it exits, and its workers follow.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import IO, Any, NoReturn

from ember.core.secrets import Redactor, secret_values
from ember.worker.loading import Loaded, load_unit
from ember.worker.output import Capture, redactor_from_env
from ember.worker.runtime import drop_privileges


def _reap(out: IO[str]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(out, {"t": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def _print_exc(
    exc: BaseException, redact: Redactor | None, served: bool = False
) -> tuple[str, str]:
    """Print the traceback of `exc` to the raw log (and, `served`, to the function's log), and
    return its one-line summary and the traceback, all with the function's secret values
    hidden."""
    text = "".join(traceback.format_exception(exc))
    try:
        summary = f"{type(exc).__name__}: {exc}"
    except Exception:
        summary = type(exc).__name__
    if redact is not None:
        text, summary = redact.text(text), redact.text(summary)
    for stream in (sys.__stderr__, sys.stderr if served else None):
        if stream is not None:
            stream.write(text)
            stream.flush()
    return summary, text


def _user_frames(text: str) -> str:
    """A traceback without the frames of ember's own loader: what the user's code did."""
    lines = text.splitlines()
    out: list[str] = []
    skip = False
    for line in lines:
        if line.startswith('  File "'):
            skip = "/ember/worker/" in line or "<frozen importlib" in line
        elif not line.startswith(" "):
            skip = False
        if not skip:
            out.append(line)
    if len(out) >= 2 and out[0].startswith("Traceback") and not out[1].startswith(" "):
        out.pop(0)  # no frame of the user's own: the error alone says it
    return "\n".join(out)[-8000:]


def _send(out: IO[str], msg: dict[str, Any]) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


class _Lines:
    """The template's printed lines, redacted, to the server as `log` messages."""

    def __init__(self, out: IO[str], redact: Redactor | None) -> None:
        self.out, self.redact = out, redact

    def __call__(self, job: str | None, stream: str, line: str) -> None:
        if self.redact is not None:
            line = self.redact.text(line)
        _send(self.out, {"t": "log", "lines": [[None, stream, line, time.time()]]})


def _become_worker(
    request: dict[str, Any],
    log_fd: int,
    loaded: Loaded,
    private: list[int],
    secrets_seen: list[str],
) -> NoReturn:
    """In the child: a new session, its own environment and output, then the worker runtime."""
    try:
        os.setsid()
        for fd in private:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.pop("EMBER_TEMPLATE", None)
        os.environ.update(request["env"])
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        from ember.worker import runtime

        runtime.main(preloaded=loaded, secrets_seen=secrets_seen, secret=request["secret"])
    except BaseException as exc:
        _print_exc(exc, redactor_from_env(dict(os.environ), secrets_seen))
        os._exit(1)
    os._exit(0)


def main() -> None:
    requests = socket.socket(fileno=os.dup(0))
    proto_out = os.fdopen(os.dup(1), "w")
    # Whatever else the server let us inherit goes: a fork holding the server's end of our
    # stdout would keep it from ever seeing this template exit (and its forks' exits with it).
    for fd in map(int, os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ()):
        if fd > 2 and fd not in (requests.fileno(), proto_out.fileno()):
            with contextlib.suppress(OSError):
                os.close(fd)
    # From here on, fds 1 and 2 are the template's raw log (the server opened it as our stderr):
    # user prints cannot break the protocol.
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    drop_privileges(os.environ)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # an accidental CUDA call here fails, not a fork
    # read before user code runs, which may take a secret out of the environment once used
    secrets_seen = secret_values(os.environ)
    redact = redactor_from_env({}, secrets_seen)
    # What the user's module prints, and what a logging handler it sets up writes, is the
    # function's log: redacted and sent to the server. Its forks take these same objects over.
    sink = _Lines(proto_out, redact)
    sys.stdout = Capture("stdout", sink)
    sys.stderr = Capture("stderr", sink)
    with contextlib.suppress(ImportError):  # imported once here, not in every fork
        import uvloop  # noqa: F401
    try:
        t0 = time.perf_counter()
        loaded = load_unit(
            Path(os.environ["EMBER_BUNDLE"]), os.environ["EMBER_APP"], os.environ["EMBER_UNIT"]
        )
        for hook in loaded.snap_hooks:
            hook()
        ready_ms = (time.perf_counter() - t0) * 1000.0
    except BaseException as exc:
        summary, text = _print_exc(exc, redact, served=True)
        _send(proto_out, {"t": "failed", "error": summary, "traceback": _user_frames(text)})
        for cap in (sys.stdout, sys.stderr):
            if isinstance(cap, Capture):
                cap.flush_job(None)
        sys.exit(1)
    for cap in (sys.stdout, sys.stderr):
        if isinstance(cap, Capture):
            cap.flush_job(None)
    # What the forks inherit stays out of their collections: the GC would otherwise write to
    # every inherited object's header and copy the page it lies on into each fork.
    gc.collect()
    gc.freeze()
    _send(proto_out, {"t": "ready", "ms": ready_ms, "pid": os.getpid()})
    if os.environ.get("EMBER_TEMPLATE_CHECK") == "1":  # templates are off: the import was all
        os._exit(0)
    private = [requests.fileno(), proto_out.fileno()]
    pending = b""
    fds: deque[int] = deque()
    while True:
        readable, _, _ = select.select([requests], [], [], 0.05)
        _reap(proto_out)
        if not readable:
            continue
        chunk, got, _, _ = socket.recv_fds(requests, 1 << 20, 16)
        if not chunk:  # the server is gone; our workers notice and exit
            os._exit(0)
        fds.extend(got)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            request = json.loads(line)
            log_fd = fds.popleft()
            pid = os.fork()
            if pid == 0:
                _become_worker(request, log_fd, loaded, [*private, *fds], secrets_seen)
            os.close(log_fd)
            _send(proto_out, {"t": "forked", "worker": request["worker"], "pid": pid})


if __name__ == "__main__":
    main()
