"""The template: a process that imports one function version once and forks its workers.

It imports the user's file and runs `@ember.enter(snap=True)` hooks (CPU-side loading, a model
read from disk, say), then waits. Each fork request becomes a worker in milliseconds: the child
inherits the imported modules and the loaded objects (shared copy-on-write), takes its own
environment (its GPUs in CUDA_VISIBLE_DEVICES), runs the remaining `@ember.enter()` hooks and
connects to the server like any worker. Nothing touches a GPU before the fork: the template runs
with no visible CUDA device.

Protocol with the server, one JSON object per line: the server writes `{"worker", "env", "log"}`
to the template's stdin; the template writes `{"t": "ready"}` or `{"t": "failed", "error"}` once,
then `{"t": "forked", "worker", "pid"}` and `{"t": "exited", "pid", "code"}` to its stdout. When
its stdin closes (the server is gone) it exits, and its workers follow (they watch their parent).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any, NoReturn

from ember.core.secrets import Redactor, secret_values
from ember.worker.runtime import Loaded, load_unit, redactor_from_env


def _reap(out: IO[str]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(out, {"t": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)})


def _print_exc(exc: BaseException, redact: Redactor | None) -> str:
    """Print the traceback of `exc` to this process's log, and return its one-line summary,
    both with the function's secret values hidden."""
    text = "".join(traceback.format_exception(exc))
    summary = f"{type(exc).__name__}: {exc}"
    if redact is not None:
        text, summary = redact.text(text), redact.text(summary)
    sys.stderr.write(text)
    sys.stderr.flush()
    return summary


def _send(out: IO[str], msg: dict[str, Any]) -> None:
    out.write(json.dumps(msg) + "\n")
    out.flush()


def _become_worker(
    request: dict[str, Any], loaded: Loaded, private: list[int], secrets_seen: list[str]
) -> NoReturn:
    """In the child: a new session, its own environment and output, then the worker runtime."""
    try:
        os.setsid()
        for fd in private:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.pop("EMBER_TEMPLATE_LOG", None)
        os.environ.update(request["env"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        from ember.worker import runtime

        runtime.main(preloaded=loaded, secrets_seen=secrets_seen)
    except BaseException as exc:
        _print_exc(exc, redactor_from_env(dict(os.environ), secrets_seen))
        os._exit(1)
    os._exit(0)


def main() -> None:
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "w")
    # From here on, fds 1 and 2 are the template's log: user prints cannot break the protocol.
    log = os.open(os.environ["EMBER_TEMPLATE_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # an accidental CUDA call here fails, not a fork
    # read before user code runs, which may take a secret out of the environment once used
    secrets_seen = secret_values(os.environ)
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
        _send(
            proto_out,
            {"t": "failed", "error": _print_exc(exc, redactor_from_env({}, secrets_seen))},
        )
        sys.exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # What the forks inherit stays out of their collections: the GC would otherwise write to
    # every inherited object's header and copy the page it lies on into each fork.
    gc.collect()
    gc.freeze()
    _send(proto_out, {"t": "ready", "ms": ready_ms})
    private = [proto_in.fileno(), proto_out.fileno()]
    pending = b""
    while True:
        readable, _, _ = select.select([proto_in], [], [], 0.05)
        _reap(proto_out)
        if not readable:
            continue
        chunk = os.read(proto_in.fileno(), 65536)
        if not chunk:  # the server is gone; our workers notice and exit
            os._exit(0)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _become_worker(request, loaded, private, secrets_seen)
            _send(proto_out, {"t": "forked", "worker": request["worker"], "pid": pid})


if __name__ == "__main__":
    main()
