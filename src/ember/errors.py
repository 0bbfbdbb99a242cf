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
    """The input does not fit the function: refused by the server (HTTP 422), or by the SDK
    before sending, for an argument JSON cannot carry (`before_sending`; `status` is 422 there
    too, so that one handler serves both)."""

    @classmethod
    def before_sending(cls, message: str) -> InvalidInput:
        err = cls(422, "invalid_input", message)
        err.args = (message,)  # nothing was sent: no "(HTTP 422 ...)" in its text
        return err


class RateLimited(ApiError):
    """The server cannot take the call now (HTTP 429): the workspace's queue is at its limit,
    which the message names; try again after `retry_after` seconds (None if it said none)."""

    retry_after: float | None = None


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
