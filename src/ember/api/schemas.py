"""Response shapes, for the OpenAPI document at /docs (handlers return plain JSON)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]


class RunRequest(BaseModel):
    input: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the function"
    )


class JobError(BaseModel):
    type: str
    message: str
    traceback: str | None = None


class Timings(BaseModel):
    queue_ms: float
    cold_start_ms: float
    load_ms: float
    exec_ms: float
    post_ms: float
    total_ms: float


class JobBody(BaseModel):
    id: str
    app: str
    function: str
    status: Status
    output: Any = None
    error: JobError | None = None
    timings: Timings | None = None
    attempts: int = 0
    created_at: float
    finished_at: float | None = None


class Accepted(BaseModel):
    id: str
    status: Status


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    jobs: dict[str, int]
    workers: dict[str, int]
    version: int


class DeployRequest(BaseModel):
    name: str
    filename: str
    source: str
    tags: dict[str, str] = Field(default_factory=dict)
    functions: list[dict[str, Any]]


class Deployed(BaseModel):
    app: str
    version: int
    functions: list[str]
    warnings: list[str] = Field(default_factory=list, description="e.g. a GPU no node has")


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong token"},
    404: {"model": ErrorBody, "description": "unknown app, function or job"},
    413: {"model": ErrorBody, "description": "request body over the payload limit"},
    422: {"model": ErrorBody, "description": "input that does not fit"},
}
