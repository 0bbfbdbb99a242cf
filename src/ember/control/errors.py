"""What the control plane's rooms refuse with; the API maps each to its status code."""

from __future__ import annotations

from typing import Any

from ember.core.budgets import Blocked
from ember.core.quotas import QueueFull


class NotFoundError(LookupError):
    """An app, function, job, policy or secret that does not exist in the workspace (404)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class InputError(ValueError):
    """A job input that does not fit the function's signature (HTTP 422)."""


class UnplaceableError(ValueError):
    """No GPU in the inventory could ever run this function (HTTP 422)."""


class ConflictError(Exception):
    """The request clashes with what exists (HTTP 409)."""


class IdempotencyConflict(ConflictError):
    """An `Idempotency-Key` reused for a request other than the one it was first sent with."""


class PolicyDenied(PermissionError):
    """The caller's usage policy does not allow this call (HTTP 403)."""


class BudgetBlocked(Exception):
    """The caller's policy has spent its budget for the period (HTTP 402)."""

    def __init__(self, blocked: Blocked) -> None:
        super().__init__(blocked.message)
        self.blocked = blocked


class QueueFullError(Exception):
    """A workspace's queue is at one of its limits (HTTP 429, or 413 when the input alone is
    larger than the bytes limit)."""

    def __init__(self, full: QueueFull) -> None:
        super().__init__(full.message)
        self.full = full


def job_error(type_: str, message: str) -> dict[str, Any]:
    """A job's `error` body for a failure the server itself decided (no user traceback)."""
    return {"type": type_, "message": message, "traceback": None}


class RetryRefused(ConflictError):
    """A job in a state a retry cannot queue again: queued, running or completed (HTTP 409)."""
