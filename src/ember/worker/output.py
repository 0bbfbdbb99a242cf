"""What user code produces, as the server receives it: printed lines tagged with their job,
outputs as strict JSON, exceptions as plain fields, all with the function's secrets hidden.
Nothing here may raise on odd user values: a job must end with a clear error, not hang."""

from __future__ import annotations

import contextvars
import io
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ember.core.secrets import Redactor, secret_values
from ember.worker import protocol

current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_job", default=None
)
progress_sink: Callable[[str, Any], None] | None = None
"""Set by a serving worker: sends (job id, progress) to the server (RunPod's `progress_update`)."""
refresh_sink: Callable[[], None] | None = None
"""Set by a serving worker: asks the server to stop it once its jobs end (`refresh_worker`)."""


def error_body(exc: BaseException, redact: Redactor | None = None) -> dict[str, Any]:
    """What the server learns of an exception; `redact` hides the function's secret values.
    Never raises (a part user code cannot format is described instead), so the job ends now."""
    name = type(exc).__name__
    try:
        message = str(exc)
    except Exception as inner:
        message = f"<the message could not be read: str() raised {type(inner).__name__}>"
    try:
        tb = "".join(traceback.format_exception(exc))
    except Exception as inner:
        tb = f"{name}: {message}\n(its traceback could not be formatted: {type(inner).__name__})"
    body = {"type": name, "message": message, "traceback": tb}
    return body if redact is None else {k: redact.text(v) for k, v in body.items()}


def output_json(value: Any, redact: Redactor | None = None) -> bytes:
    """An output (a result or a streamed value) as JSON, with the function's secret values
    hidden; raises TypeError or ValueError (too deeply nested too) when it is not JSON."""
    try:
        if redact is not None:
            value = redact.json(value)
        return protocol.dumps_value(value).encode()
    except RecursionError:
        raise ValueError(f"it is nested more than {sys.getrecursionlimit()} levels deep") from None


def redactor_from_env(env: Mapping[str, str], also: Sequence[str] = ()) -> Redactor | None:
    """The redactor of the secrets the server gave this process (EMBER_SECRET_KEYS) and of
    `also`, or None when there is nothing to hide, so that the paths that send data skip
    redaction entirely."""
    redactor = Redactor([*secret_values(env), *also])
    return redactor if redactor else None


class Capture(io.TextIOBase):
    """sys.stdout / sys.stderr: each complete line goes to the server tagged with its job id."""

    def __init__(self, stream: str, sink: Callable[[str | None, str, str], None]) -> None:
        self.name = f"<{stream}>"
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
