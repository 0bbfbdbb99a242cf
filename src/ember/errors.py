"""Exceptions a caller of ember may catch."""

from __future__ import annotations


class EmberError(Exception):
    """Base class of every error ember raises on purpose."""


class InvalidSpec(EmberError, ValueError):
    """A decorator option cannot work (raised at decoration or deploy)."""


class UnknownOption(InvalidSpec, TypeError):
    """A decorator was given an option it does not have (a TypeError, as for any unknown keyword)."""


class ApiError(EmberError):
    """The server refused a request; `status` is the HTTP status, `code` its short name."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} (HTTP {status} {code})")
        self.status = status
        self.code = code
        self.message = message


class AuthError(ApiError):
    pass


class NotFound(ApiError):
    pass


class InvalidInput(ApiError):
    pass


class ServerUnavailable(EmberError):
    """No ember server answered at the configured URL."""


class RemoteError(EmberError):
    """The function raised: `type`, `message` and `remote_traceback` are the remote exception's."""

    def __init__(self, job_id: str, type: str, message: str, traceback: str | None) -> None:
        super().__init__(f"{type}: {message} (job {job_id})")
        self.job_id = job_id
        self.type = type
        self.message = message
        self.remote_traceback = traceback


class JobTimeout(EmberError):
    """The job ran past its function's `timeout` and was stopped."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(f"{message} (job {job_id})")
        self.job_id = job_id


class JobCancelled(EmberError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


class ResultTimeout(EmberError, TimeoutError):
    """`Job.result(timeout=...)` gave up waiting; the job goes on."""
